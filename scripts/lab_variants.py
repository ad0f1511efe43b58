"""The anomaly lab's cases as another acquisition would have made them (thinner or thicker slices, a lower dose):
the loop that `benchmark_thin_slices.py`, `benchmark_dose.py` and `benchmark_thick_slices.py` share.

Each case is turned into each variant (an image and its lesion mask on the variant's grid), scored by each scorer
(a lab cross-calibration: each slab against a calibration fitted on the *other* slab's normal case, at 2 mm and full
dose), and summarized at the default sensitivity: false findings on the normal slabs, their volume p-values and
reference-check warnings, and which lesions a finding overlaps.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from medanomaly.api import detect_volume
from medanomaly.ensemble import load_scorer
from medanomaly.lab import MANIFEST, TARGET_SUBSETS, cross_calibrated
from medanomaly.preprocess import body_mask
from medanomaly.volumes import volume_from_image

HIGHPASS_PX = 2.0
# a variant: (the case's image, its lesion mask as float32 or None, the case's index) -> (image, mask array or None)
Variant = Callable[[sitk.Image, "sitk.Image | None", int], "tuple[sitk.Image, np.ndarray | None]"]


def lab_parser(doc: str) -> argparse.ArgumentParser:
    """The options every lab-variant benchmark has: the cases, the model and where to write the JSON."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256", help="catalog name, bundle folder or ensemble")
    ap.add_argument("--json", default=None)
    return ap


def lab_cases(folder: str | Path) -> tuple[Path, list[dict]]:
    """The lab's case folder and the cases its manifest lists."""
    cases_dir = Path(folder)
    return cases_dir, json.loads((cases_dir / MANIFEST).read_text())["cases"]


def lesion_mask(labels: sitk.Image | None) -> np.ndarray | None:
    """A lesion case's mask (any label above 0) as an array; None for a normal case."""
    return None if labels is None else sitk.GetArrayFromImage(labels) > 0


def run_model(args: argparse.Namespace, cases_dir: Path, cases: list[dict], variants: dict[str, "Variant"],
              result: dict) -> dict:
    """Every variant scored by args.model, cross-calibrated, summarized into `result` and written to args.json."""
    crossed = cross_calibrated(load_scorer(args.model), cases_dir, cases)
    return finish({"model": args.model, **result}, score_variants(cases_dir, cases, {"default": crossed}, variants),
                  args.json)


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


def first_normal_noise(cases_dir: Path, cases: list[dict]) -> dict:
    noise = measure_noise(sitk.ReadImage(str(cases_dir / next(c for c in cases if c["normal"])["volume"])))
    print(f"noise of the first normal slab: {noise}", flush=True)
    return noise


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


def score_variants(cases_dir: Path, cases: list[dict], scorers: dict[str, dict],
                   variants: dict[str, Variant]) -> dict[str, list[dict]]:
    """One row per case for every variant and scorer (a cross-calibration by group); keys "variant", or
    "scorer variant" with several scorers."""
    def key(mode: str, name: str) -> str:
        return f"{mode} {name}" if len(scorers) > 1 else name

    rows = {key(mode, name): [] for name in variants for mode in scorers}
    for index, case in enumerate(cases):
        image = sitk.ReadImage(str(cases_dir / case["volume"]))
        labels = None if case["normal"] else sitk.ReadImage(str(cases_dir / case["labels"]), sitk.sitkFloat32)
        for name, make in variants.items():
            varied, lesion = make(image, labels, index)
            for mode, crossed in scorers.items():
                result = detect_volume(volume_from_image(varied, name=case["case"]), crossed[case["group"]])
                rows[key(mode, name)].append(case_row(case, result, lesion))
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


def finish(result: dict, rows: dict[str, list[dict]], json_path: str | None) -> dict:
    """The summaries and rows added to `result`, the summaries printed, the whole written to `json_path`."""
    result.update(summary={key: summarize(r) for key, r in rows.items()}, cases=rows)
    print(json.dumps(result["summary"], indent=1), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return result
