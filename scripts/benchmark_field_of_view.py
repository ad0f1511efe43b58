"""A trunk wider than the model's field of view: how many findings lie where the model window cuts through the body,
with and without the band along the cut that `preprocess` leaves out of the scored region (`CUT_EDGE_MM`).

Every shipped model sees a 448 mm square around the body's centre. We have no CT of a patient that wide, so this
script widens real ones: the same voxels with a 1.5x larger spacing along the patient's left-right axis (a larger
patient, every structure 1.5x wider). The anatomy is then also unlike normal, so findings elsewhere are expected; the
count that matters is those in the band along a cut edge (as `preprocess` draws it, `CUT_EDGE_MM` + 5 mm wide),
where the body ends abruptly in air.

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
from medanomaly.engine import to_native
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


def near_cut(result, spec, margin_mm: float) -> list[int]:
    """Ids of findings with voxels in the band that preprocess leaves out along cut-off edges when the band is
    `margin_mm` wide: the scored region without a band less the one with it, mapped onto the input grid."""
    reorientation = Reorientation.for_image(result.volume.image)
    hu = reorientation.to_canonical(result.volume.hu)
    saved = preprocess.CUT_EDGE_MM
    try:
        preprocess.CUT_EDGE_MM = 0.0
        whole = preprocess.prepare_slices(hu, reorientation.canonical_spacing, spec)
        preprocess.CUT_EDGE_MM = margin_mm
        banded = preprocess.prepare_slices(hu, reorientation.canonical_spacing, spec).region
    finally:
        preprocess.CUT_EDGE_MM = saved
    band = to_native((whole.region & ~banded).astype(np.float32), whole) > 0.5
    labels = result.labels[reorientation.to_input(band)]
    return sorted(int(v) for v in np.unique(labels) if v)


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
            close = near_cut(result, scorer.spec, band + 5.0)
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
