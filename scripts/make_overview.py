"""Make Resources/overview.png (README and extension screenshot): the shared chest CT with a synthetic solid nodule
inserted into the lung by medanomaly.synth, through `medanomaly detect` with the default model.

    python scripts/make_overview.py --kind consolidation --diameter 40 --sensitivity 0.8
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk

import medanomaly
from medanomaly.synth import LesionInserter

ROOT = Path(__file__).resolve().parents[1]
CHEST = ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--diameter", type=float, default=14.0)
    ap.add_argument("--sensitivity", type=float, default=None)
    ap.add_argument("--kind", default="nodule_solid")
    ap.add_argument("--output", default=str(ROOT / "Resources" / "overview.png"))
    args = ap.parse_args()
    source = CHEST if CHEST.exists() else ROOT / "Testing" / "Data" / "chest_ct_demo.nii.gz"
    image = sitk.ReadImage(str(source))
    params = {"diameter_mm": args.diameter} if args.kind != "effusion" else {}
    insertion = LesionInserter(image).insert(args.kind, seed=args.seed, **params)
    with_nodule = sitk.GetImageFromArray(insertion.volume)
    with_nodule.CopyInformation(image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chest_ct_with_lesion.nii.gz"
        sitk.WriteImage(with_nodule, str(path))
        (result,) = medanomaly.detect(path, Path(tmp) / "out", model=args.model, sensitivity=args.sensitivity)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(result.output_dir / "overview.png", args.output)
    labels = result.labels[insertion.mask]
    print(f"{source.name} + {args.diameter:g} mm {args.kind} at {insertion.record['centre_lps_mm']} (LPS mm): "
          f"{len(result.findings)} finding(s), lesion found: {bool(labels.any())}, "
          f"volume score {result.volume_score:.3f}, sensitivity {args.sensitivity} -> {args.output}")


if __name__ == "__main__":
    main()
