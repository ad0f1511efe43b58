"""A trunk wider than the model's field of view: how many findings lie where the model window cuts through the body,
with and without the band along the cut that `preprocess` leaves out of the scored region (`CUT_EDGE_MM`).

Every shipped model sees a 448 mm square around the body's centre. We have no CT of a patient that wide, so this
script widens real ones: the same voxels with a 1.5x larger spacing along the patient's left-right axis (a larger
patient, every structure 1.5x wider). The anatomy is then also unlike normal, so findings elsewhere are expected; the
count that matters is those within `CUT_EDGE_MM` + 5 mm of a cut edge, where the body ends abruptly in air.

    python scripts/benchmark_field_of_view.py --json scripts/results/benchmark_field_of_view.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medanomaly import preprocess
from medanomaly.api import detect_volume
from medanomaly.ensemble import load_scorer
from medanomaly.orientation import Reorientation
from medanomaly.volumes import read_volume, volume_from_image

ROOT = Path(__file__).resolve().parents[1]
CTS = [ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz",
       ROOT / "Testing" / "Data" / "chest_ct_demo.nii.gz"]


def widened(image: sitk.Image, factor: float) -> sitk.Image:
    """The image with its spacing along the axis closest to patient left-right multiplied by `factor`."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[0])))  # image axis whose direction has the largest x (L-R) part
    spacing = list(image.GetSpacing())
    spacing[axis] *= factor
    out = sitk.Image(image)
    out.SetSpacing(spacing)
    return out


def near_cut(result, coverage: dict, margin_mm: float) -> list[int]:
    """Ids of findings whose voxels come within margin_mm of a window edge that cuts through the body."""
    image = result.volume.image
    reorientation = Reorientation.for_image(image)
    labels = reorientation.to_canonical(result.labels)  # [S, P, L]
    _, sy, sx = reorientation.canonical_spacing
    ids = set()
    if not labels.any():
        return []
    # the window's edges in canonical pixels: the body's extent less what reaches beyond on each side
    body = preprocess.body_mask(np.asarray(reorientation.to_canonical(result.volume.hu), np.float32))
    brows, bcols = np.nonzero(body.any(axis=(0, 2)))[0], np.nonzero(body.any(axis=(0, 1)))[0]
    beyond = coverage["beyond_mm"]
    edges = {"anterior": (1, brows[0] * sy + beyond["anterior"]),
             "posterior": (1, (brows[-1] + 1) * sy - beyond["posterior"]),
             "right": (2, bcols[0] * sx + beyond["right"]), "left": (2, (bcols[-1] + 1) * sx - beyond["left"])}
    for side, (axis, edge_mm) in edges.items():
        if beyond[side] <= 0:
            continue
        spacing = sy if axis == 1 else sx
        position = (np.arange(labels.shape[axis]) + 0.5) * spacing
        close = np.abs(position - edge_mm) <= margin_mm
        picked = labels[:, close, :] if axis == 1 else labels[:, :, close]
        ids.update(int(v) for v in np.unique(picked) if v)
    return sorted(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256")
    ap.add_argument("--factor", type=float, default=1.5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    scorer = load_scorer(args.model)
    rows = []
    band = preprocess.CUT_EDGE_MM
    for path in CTS:
        image = widened(read_volume(path).image, args.factor)
        for cut_edge_mm in (0.0, band):
            preprocess.CUT_EDGE_MM = cut_edge_mm
            result = detect_volume(volume_from_image(image, name=path.name), scorer)
            close = near_cut(result, result.coverage, band + 5.0)
            rows.append({"ct": path.name, "factor": args.factor, "cut_edge_mm": cut_edge_mm,
                         "coverage": result.coverage, "findings": len(result.findings),
                         "findings_at_cut_edges": len(close),
                         "p_values_at_cut_edges": [f["p_value"] for f in result.findings if f["id"] in close],
                         "volume_p_value": result.volume_p_value})
            print(json.dumps(rows[-1]), flush=True)
    preprocess.CUT_EDGE_MM = band
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
