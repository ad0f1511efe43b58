"""Probe (stop 35): a tube outlier's strongest false positives on the lab's normal slabs against its needle peaks.

    python scripts/experiment_tube_line_ratio.py MODEL CASES_DIR [CASES_DIR ...]

For each case set, scored with cross calibration as the lab scores: per normal slab the peaks of its 8 strongest
components at significance 3 or more; per needle case the needle's peak and the strongest voxel 2 voxels or more
outside it. Result: scripts/results/experiment_tube_line_ratio.txt.
"""

import argparse
from pathlib import Path

import SimpleITK as sitk
from scipy import ndimage as ndi

from medanomaly.api import detect_volume
from medanomaly.findings import CONNECTIVITY
from medanomaly.lab import cross_calibrated_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("cases", nargs="+")
    args = ap.parse_args()
    for cases_dir in map(Path, args.cases):
        print("##", args.model, cases_dir)
        for case, volume, scorer in cross_calibrated_cases(cases_dir, args.model):
            if not (case["normal"] or any(lesion["kind"] == "needle" for lesion in case["lesions"])):
                continue
            significance = detect_volume(volume, scorer, device="cpu").significance
            if case["normal"]:
                components, n = ndi.label(significance >= 3.0, structure=CONNECTIVITY)
                peaks = ndi.maximum(significance, components, range(1, n + 1)) if n else []
                print(case["case"], sorted((round(float(p), 2) for p in peaks), reverse=True)[:8])
            else:
                lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(cases_dir / case["labels"]))) > 0
                outside = significance[~ndi.binary_dilation(lesion, iterations=2)].max()
                print(case["case"], "needle peak %.2f outside max %.2f" % (significance[lesion].max(), outside))


if __name__ == "__main__":
    main()
