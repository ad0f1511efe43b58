"""Does leaving bone out of the tube outlier remove its false findings on normal CT and keep the needles?

For a tube-outlier bundle, every normal slab and needle case of a lab case set, cross-calibrated as the lab scores
them: per normal slab its strongest components above significance 3 (peak, highest native HU within 5x5 pixels of
the peak), per needle case the needle's peak.

    python scripts/train_default_models.py --only chest-ct-tube-outlier-no-bone --output runs/tube-exp
    python scripts/experiment_tube_outlier.py --cases runs/lab-cases --model runs/tube-exp/chest-ct-tube-outlier-no-bone

The cases come from chest_ct_01 (see ../shared/data/SOURCES.md for its provenance).
"""

import argparse

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from medanomaly.api import detect_volume
from medanomaly.lab import cross_calibrated_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--model", default="chest-ct-tube-outlier")
    args = ap.parse_args()
    for case, volume, scorer in cross_calibrated_cases(args.cases, args.model):
        if not (case["normal"] or "needle" in case["case"]):
            continue
        s = detect_volume(volume, scorer).significance
        local_max_hu = ndi.maximum_filter(volume.hu, size=(1, 5, 5))
        if case["normal"]:
            labels, n = ndi.label(s > 3.0)
            peaks = ndi.maximum(s, labels, range(1, n + 1))
            where = ndi.maximum_position(s, labels, range(1, n + 1))
            print(case["case"], [(round(float(peaks[i]), 2), int(local_max_hu[where[i]]))
                                 for i in np.argsort(peaks)[::-1][:8]])
        else:
            lesion = sitk.GetArrayFromImage(sitk.ReadImage(f"{args.cases}/{case['labels']}")) > 0
            near = ndi.binary_dilation(lesion, iterations=2)
            peak = np.unravel_index(np.argmax(np.where(near, s, -1)), s.shape)
            print(case["case"], "peak", round(float(s[peak]), 2), "max HU at the peak", int(local_max_hu[peak]))


if __name__ == "__main__":
    main()
