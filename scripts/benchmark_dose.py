"""Lower-dose CT: how do false findings, lesion findings and the reference check change when a scan is noisier than
the one the model was trained and calibrated on?

CT noise std grows as 1/sqrt(dose). No lower-dose scan of a real CT was available, so this script adds noise to the
anomaly lab's cases as a dose reduction would: independent Gaussian noise in every slice, correlated in-plane as the
scan's own noise is, of std sigma0 * sqrt(1 / dose - 1), so that the total is sigma0 / sqrt(dose). sigma0 and the
correlation are measured on the first normal slab's soft tissue (`benchmark_thin_slices.measure_noise`). Real
low-dose scans also show streaks and a noise that varies with the patient's thickness, which this does not model.

Each lab slab (2 normal 20-slice slabs of `chest_ct_01` and 34 with one inserted lesion) is scored against a
calibration fitted on the *other* slab's normal case at full dose (the lab's cross-calibration), at the default
sensitivity, with the same noise for every dose's case (one seed per case, scaled).

    python scripts/benchmark_dose.py --cases runs/lab-cases --json scripts/results/benchmark_dose.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from benchmark_thin_slices import case_row, measure_noise, summarize

from medanomaly.api import detect_volume
from medanomaly.ensemble import load_scorer
from medanomaly.lab import MANIFEST, cross_calibrated
from medanomaly.synth import thinner_slices
from medanomaly.volumes import volume_from_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256", help="catalog name, bundle folder or ensemble")
    ap.add_argument("--doses", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                    help="fractions of the recorded dose (1: the cases as they are)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases_dir = Path(args.cases)
    cases = json.loads((cases_dir / MANIFEST).read_text())["cases"]
    noise = measure_noise(sitk.ReadImage(str(cases_dir / next(c for c in cases if c["normal"])["volume"])))
    print(f"noise of the first normal slab: {noise}", flush=True)
    crossed = cross_calibrated(load_scorer(args.model), cases_dir, cases)
    rows = {f"dose {dose:g}": [] for dose in args.doses}
    for index, case in enumerate(cases):
        image = sitk.ReadImage(str(cases_dir / case["volume"]))
        lesion = None if case["normal"] else sitk.GetArrayFromImage(
            sitk.ReadImage(str(cases_dir / case["labels"]))) > 0
        for dose in args.doses:
            added = noise["noise_std_hu"] * np.sqrt(1.0 / dose - 1.0)
            noisy = thinner_slices(image, 1, added, noise["noise_sigma_px"], seed=index) if added > 0 else image
            result = detect_volume(volume_from_image(noisy, name=case["case"]), crossed[case["group"]])
            rows[f"dose {dose:g}"].append(case_row(case, result, lesion))
        print(f"{case['case']}: done", flush=True)
    result = {"model": args.model, "noise": noise, "doses": args.doses,
              "added_noise_std_hu": {f"dose {d:g}": round(noise["noise_std_hu"] * np.sqrt(1.0 / d - 1.0), 2)
                                     for d in args.doses},
              "summary": {key: summarize(r) for key, r in rows.items()}, "cases": rows}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
