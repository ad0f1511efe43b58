"""Thick-slice CT: what happens when a scan's slices are thicker than the 2 mm the models learned from?

Thick slices cannot be made thin, so `detect` uses them as they are (`input.slice_mm` only averages thinner ones).
This script makes the anomaly lab's 2 mm cases thicker, as a reconstruction at `factor` x 2 mm would be: the mean of
each run of `factor` adjacent slices (SimpleITK's BinShrink: a box profile; a remainder at the end is dropped), the
lesion masks as their union, and scores them with each slab calibrated on the *other* slab's normal case at 2 mm
(the lab's cross-calibration), at the default sensitivity: false findings on the normal slabs, lesions found,
reference-check warnings (`benchmark_thin_slices.summarize`).

    python scripts/benchmark_thick_slices.py --cases runs/lab-cases --json scripts/results/benchmark_thick_slices.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import SimpleITK as sitk
from benchmark_thin_slices import case_row, summarize

from medanomaly.api import detect_volume
from medanomaly.ensemble import load_scorer
from medanomaly.lab import MANIFEST, cross_calibrated
from medanomaly.volumes import volume_from_image


def thicker(image: sitk.Image, factor: int) -> sitk.Image:
    """Runs of `factor` slices along k averaged into one (SimpleITK's BinShrink: the mean, centred on the run)."""
    return sitk.BinShrink(image, [1, 1, factor]) if factor > 1 else image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256", help="catalog name, bundle folder or ensemble")
    ap.add_argument("--factors", nargs="+", type=int, default=[1, 2, 3],
                    help="how many 2 mm slices make one (1: the cases as they are)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases_dir = Path(args.cases)
    cases = json.loads((cases_dir / MANIFEST).read_text())["cases"]
    crossed = cross_calibrated(load_scorer(args.model), cases_dir, cases)
    rows = {f"{2 * f} mm": [] for f in args.factors}
    for case in cases:
        image = sitk.ReadImage(str(cases_dir / case["volume"]))
        labels = None if case["normal"] else sitk.ReadImage(str(cases_dir / case["labels"]), sitk.sitkFloat32)
        for factor in args.factors:
            thick = thicker(image, factor)
            # a thick slice holds the lesion where any of its thin ones did: the mean of the mask is above 0
            lesion = None if labels is None else sitk.GetArrayFromImage(thicker(labels, factor)) > 0
            result = detect_volume(volume_from_image(thick, name=case["case"]), crossed[case["group"]])
            rows[f"{2 * factor} mm"].append(case_row(case, result, lesion))
        print(f"{case['case']}: done", flush=True)
    result = {"model": args.model, "factors": args.factors,
              "summary": {key: summarize(r) for key, r in rows.items()}, "cases": rows}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
