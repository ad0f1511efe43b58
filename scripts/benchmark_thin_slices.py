"""Thin-slice CT: does averaging thin slices to the model's slice thickness (the card's `input.slice_mm`) keep false
findings, lesion findings, time and memory where they are on the thickness the model was trained on?

Every shipped model learned normal CT from 2 mm slices and was calibrated on them, but most chest CT today is also
reconstructed at 0.5-1 mm, and a thinner slice of the same scan is noisier (noise std ~ 1/sqrt(thickness)). With
`slice_mm`, `detect` averages thin slices to the model's thickness before the network and maps the heatmap back
onto the thin input grid; without it (`slice_mm` 0, as before software 0.3.0) the network sees each thin slice.

We have no thin-slice reconstruction of any real CT, so this script makes them: each case, as if reconstructed
`factor` times thinner (`medanomaly.synth.thinner_slices`): linear interpolation between its 2 mm slices plus
independent noise in every thin slice, of std sigma0 * sqrt(factor - 1), where sigma0 and the noise's in-plane
correlation are measured on the case's own soft tissue (sigma0: the robust std of what a 2-pixel Gaussian high-pass
leaves; the correlation: the Gaussian whose filtered white noise has the same neighbour correlation in that
high-pass). Real thin slices differ: their in-plane resolution is the same, but the interpolation here makes
anatomy smoother along S than a real thin reconstruction, so this measures the noise, not the sharpness.

1. The anomaly lab's 36 cases (2 normal 20-slice slabs of `chest_ct_01` and 34 with one inserted lesion), each slab
   scored against a calibration fitted on the *other* slab's normal case at 2 mm (the lab's cross-calibration), at
   2 mm and at each factor, with and without averaging: false findings on the normal slabs and their volume
   p-values, and which lesions a finding at the default sensitivity overlaps.
2. `medanomaly detect` of the whole chest CT made `--speed-factor` times thinner, with and without averaging, as
   child processes, alternating: median time and peak RSS of `--runs` runs each.

    python scripts/benchmark_thin_slices.py --cases runs/lab-cases --json scripts/results/benchmark_thin_slices.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from lab_variants import Variant, finish, first_normal_noise, lab_cases, lab_parser, lesion_mask, score_variants

from medanomaly.bundle import CARD_NAME
from medanomaly.ensemble import load_scorer, model_folders
from medanomaly.lab import cross_calibrated
from medanomaly.synth import thinner_slices

ROOT = Path(__file__).resolve().parents[1]
CHEST_CT = ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz"
def without_slice_averaging(bundle: Path, folder: Path) -> Path:
    """A copy of the bundle whose card scores every native slice (input.slice_mm removed), same weights."""
    target = folder / bundle.name
    shutil.copytree(bundle, target)
    card = json.loads((target / CARD_NAME).read_text())
    card["input"].pop("slice_mm", None)
    (target / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return target


def thin_case(image: sitk.Image, factor: int, noise: dict, seed: int) -> sitk.Image:
    if factor == 1:
        return image
    return thinner_slices(image, factor, noise["noise_std_hu"] * np.sqrt(factor - 1), noise["noise_sigma_px"], seed)


def thin_variant(factor: int, noise: dict) -> Variant:
    """The case `factor` times thinner, with the lesion mask on the thin grid (nearest)."""
    def make(image, labels, index):
        thin = thin_case(image, factor, noise, seed=1000 * factor + index)
        return thin, lesion_mask(None if labels is None else
                                 sitk.Resample(labels, thin, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return make


def speed(ct: Path, factor: int, noise: dict, bundles: dict, runs: int, folder: Path) -> dict:
    thin = thin_case(sitk.ReadImage(str(ct)), factor, noise, seed=7)
    path = folder / f"{ct.name.split('.')[0]}_x{factor}.nii.gz"
    sitk.WriteImage(thin, str(path))
    out = {"input": str(path.name), "size": list(thin.GetSize()), "spacing_mm": list(thin.GetSpacing()), "runs": {}}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for run in range(runs):
        for mode, bundle in bundles.items():
            dest = folder / f"out_{mode}_{run}"
            cmd = [sys.executable, "-m", "medanomaly.cli", "detect", str(path), "-o", str(dest), "--model", str(bundle),
                   "--no-overview"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0  # the whole command, as a user waits for it: start-up and writing too
            found = json.loads(next(dest.glob("*/findings.json")).read_text())
            out["runs"].setdefault(mode, []).append({
                "command_s": round(wall, 2), "network_s": round(found["timings_s"]["network"], 2),
                "peak_rss_mb": found["peak_rss_mb"], "findings": len(found["findings"]),
                "volume_p_value": found["volume_p_value"],
                "slices_unlike": found["reference_check"].get("slices_unlike")})
            shutil.rmtree(dest)
            print(f"speed {mode} run {run}: {out['runs'][mode][-1]}", flush=True)
    for mode, items in out["runs"].items():
        out[mode] = {key: statistics.median(r[key] for r in items) for key in ("command_s", "network_s", "peak_rss_mb")}
    return out


def main() -> None:
    ap = lab_parser(__doc__)
    ap.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4],
                    help="how many times thinner than the cases' 2 mm (1: the cases as they are)")
    ap.add_argument("--ct", default=str(CHEST_CT), help="whole CT for the speed runs")
    ap.add_argument("--speed-factor", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="speed runs per mode (0: none)")
    args = ap.parse_args()
    cases_dir, cases = lab_cases(args.cases)
    scorer = load_scorer(args.model)
    (bundle,) = model_folders(args.model)
    noise = first_normal_noise(cases_dir, cases)
    with tempfile.TemporaryDirectory(prefix="thin-slices-") as tmp:
        folder = Path(tmp)
        native_bundle = without_slice_averaging(Path(bundle), folder)
        native = load_scorer(str(native_bundle))
        assert native.spec.slice_mm == 0 and scorer.spec.slice_mm > 0, "the model must average thin slices"
        scorers = {"averaged": cross_calibrated(scorer, cases_dir, cases),
                   "per-slice": cross_calibrated(native, cases_dir, cases)}
        variants = {f"x{factor}": thin_variant(factor, noise) for factor in args.factors}
        rows = score_variants(cases_dir, cases, scorers, variants)
        result = finish({"model": scorer.card["name"], "slice_mm": scorer.spec.slice_mm, "noise": noise,
                         "factors": args.factors}, rows, args.json)
        if args.runs > 0:
            result["speed"] = speed(Path(args.ct), args.speed_factor, noise,
                                    {"averaged": Path(bundle), "per-slice": native_bundle}, args.runs,
                                    folder)
            print(json.dumps({k: v for k, v in result["speed"].items() if k != "runs"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
