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

import argparse
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
from scipy import ndimage as ndi

from medanomaly.api import detect_volume
from medanomaly.bundle import CARD_NAME
from medanomaly.ensemble import load_scorer, model_folders
from medanomaly.lab import MANIFEST, TARGET_SUBSETS, cross_calibrated
from medanomaly.preprocess import body_mask
from medanomaly.synth import thinner_slices
from medanomaly.volumes import volume_from_image

ROOT = Path(__file__).resolve().parents[1]
CHEST_CT = ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz"
HIGHPASS_PX = 2.0


def _highpass_stats(x: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Robust std and neighbour (along i) correlation of x minus its in-plane Gaussian blur, inside mask."""
    r = x - ndi.gaussian_filter(x, (0, HIGHPASS_PX, HIGHPASS_PX))
    pair = mask[:, :, :-1] & mask[:, :, 1:]
    values = r[mask]
    mad = float(np.median(np.abs(values - np.median(values))) * 1.4826)
    return mad, float(np.corrcoef(r[:, :, :-1][pair], r[:, :, 1:][pair])[0, 1])


def measure_noise(image: sitk.Image, seed: int = 0) -> dict:
    """The noise of a CT's soft tissue (-150..150 HU, eroded): its std and the in-plane Gaussian correlation (pixels)
    whose filtered white noise has the same high-pass neighbour correlation and std ratio."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    tissue = ndi.binary_erosion(body_mask(hu) & (hu > -150) & (hu < 150), iterations=3)
    mad, rho = _highpass_stats(hu, tissue)
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((8, 192, 192)).astype(np.float32)
    inner = np.zeros(white.shape, bool)
    inner[:, 8:-8, 8:-8] = True
    best = None
    for sigma in np.arange(0.0, 1.51, 0.05):
        noise = ndi.gaussian_filter(white, (0, sigma, sigma)) if sigma > 0 else white.copy()
        noise /= noise.std()
        ratio, r = _highpass_stats(noise, inner)
        if best is None or abs(r - rho) < abs(best[2] - rho):
            best = (float(sigma), ratio, r)
    sigma, ratio, _ = best
    return {"highpass_std_hu": round(mad, 2), "highpass_neighbour_correlation": round(rho, 3),
            "noise_sigma_px": round(sigma, 2), "noise_std_hu": round(mad / ratio, 2)}


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


def case_row(case: dict, result, lesion: np.ndarray | None) -> dict:
    """What summarize() needs of one lab case's detection: findings, volume p-value, reference-check warnings, time,
    and for a lesion case whether a finding overlaps the lesion (mask on the detection's grid) and its p-value."""
    row = {"case": case["case"], "normal": bool(case["normal"]), "findings": len(result.findings),
           "volume_p_value": result.volume_p_value, "slices_unlike": result.reference_check.get("slices_unlike"),
           "model_slices": result.settings["model_slices"],
           "seconds": result.timings["pipeline"] + result.timings["network"]}
    if lesion is not None:
        hit = set(np.unique(result.labels[lesion & (result.labels > 0)]).tolist())
        row.update(lesion=case["lesions"][0], found=bool(hit),
                   p_value=min((f["p_value"] for f in result.findings if f["id"] in hit), default=None))
    return row


def score_cases(cases_dir: Path, cases: list[dict], scorers: dict, factors: list[int], noise: dict) -> dict:
    rows = {f"{mode} x{factor}": [] for factor in factors for mode in scorers}
    for index, case in enumerate(cases):
        image = sitk.ReadImage(str(cases_dir / case["volume"]))
        labels = None if case["normal"] else sitk.ReadImage(str(cases_dir / case["labels"]))
        for factor in factors:
            thin = thin_case(image, factor, noise, seed=1000 * factor + index)
            lesion = None
            if labels is not None:
                lesion = sitk.GetArrayFromImage(sitk.Resample(labels, thin, sitk.Transform(),
                                                              sitk.sitkNearestNeighbor, 0)) > 0
            for mode, crossed in scorers.items():
                result = detect_volume(volume_from_image(thin, name=case["case"]), crossed[case["group"]])
                rows[f"{mode} x{factor}"].append(case_row(case, result, lesion))
        print(f"{case['case']}: done", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    normal = [r for r in rows if r["normal"]]
    lesions = [r for r in rows if not r["normal"]]
    out = {"false_findings_on_normal_slabs": [r["findings"] for r in normal],
           "normal_volume_p_values": [r["volume_p_value"] for r in normal],
           "normal_slices_unlike_reference": [r["slices_unlike"] for r in normal],
           "lesions_found": f"{sum(r['found'] for r in lesions)}/{len(lesions)}",
           "lesion_cases_warned": sum(bool(r["slices_unlike"]) for r in lesions),
           "median_seconds_per_case": round(statistics.median(r["seconds"] for r in rows), 2)}
    for group, rule in TARGET_SUBSETS.items():
        members = [r for r in lesions if rule(r["lesion"])]
        out[f"{group}_found"] = f"{sum(r['found'] for r in members)}/{len(members)}"
    return out


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256", help="catalog name or bundle folder")
    ap.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4],
                    help="how many times thinner than the cases' 2 mm (1: the cases as they are)")
    ap.add_argument("--ct", default=str(CHEST_CT), help="whole CT for the speed runs")
    ap.add_argument("--speed-factor", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="speed runs per mode (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases_dir = Path(args.cases)
    cases = json.loads((cases_dir / MANIFEST).read_text())["cases"]
    scorer = load_scorer(args.model)
    (bundle,) = model_folders(args.model)
    noise = measure_noise(sitk.ReadImage(str(cases_dir / next(c for c in cases if c["normal"])["volume"])))
    print(f"noise of the first normal slab: {noise}", flush=True)
    with tempfile.TemporaryDirectory(prefix="thin-slices-") as tmp:
        folder = Path(tmp)
        native_bundle = without_slice_averaging(Path(bundle), folder)
        native = load_scorer(str(native_bundle))
        assert native.spec.slice_mm == 0 and scorer.spec.slice_mm > 0, "the model must average thin slices"
        scorers = {"averaged": cross_calibrated(scorer, cases_dir, cases),
                   "per-slice": cross_calibrated(native, cases_dir, cases)}
        rows = score_cases(cases_dir, cases, scorers, args.factors, noise)
        result = {"model": scorer.card["name"], "slice_mm": scorer.spec.slice_mm, "noise": noise,
                  "factors": args.factors, "summary": {key: summarize(r) for key, r in rows.items()}, "cases": rows}
        print(json.dumps(result["summary"], indent=1), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        if args.runs > 0:
            result["speed"] = speed(Path(args.ct), args.speed_factor, noise,
                                    {"averaged": Path(bundle), "per-slice": native_bundle}, args.runs,
                                    folder)
            print(json.dumps({k: v for k, v in result["speed"].items() if k != "runs"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
