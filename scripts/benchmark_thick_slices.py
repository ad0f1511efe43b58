"""Thick-slice CT: what happens when a scan's slices are thicker than the 2 mm the models learned from?

Thick slices cannot be made thin, so `detect` uses them as they are (`input.slice_mm` only averages thinner ones).
This script makes the anomaly lab's 2 mm cases thicker, as a reconstruction at `factor` x 2 mm would be: the mean of
each run of `factor` adjacent slices (SimpleITK's BinShrink: a box profile; a remainder at the end is dropped), the
lesion masks as their union, and scores them with each slab calibrated on the *other* slab's normal case at 2 mm
(the lab's cross-calibration), at the default sensitivity: false findings on the normal slabs, lesions found,
reference-check warnings (`lab_variants`).

    python scripts/benchmark_thick_slices.py --cases runs/lab-cases --json scripts/results/benchmark_thick_slices.json
"""

from __future__ import annotations


import SimpleITK as sitk
from lab_variants import Variant, lab_cases, lab_parser, lesion_mask, run_model


def thick_variant(factor: int) -> Variant:
    """Runs of `factor` slices along k averaged into one (SimpleITK's BinShrink: the mean, centred on the run); a
    thick slice holds the lesion where any of its thin ones did (the mask's mean is above 0)."""
    def make(image, labels, index):
        if factor == 1:
            return image, lesion_mask(labels)
        return (sitk.BinShrink(image, [1, 1, factor]),
                lesion_mask(None if labels is None else sitk.BinShrink(labels, [1, 1, factor])))
    return make


def main() -> None:
    ap = lab_parser(__doc__)
    ap.add_argument("--factors", nargs="+", type=int, default=[1, 2, 3],
                    help="how many 2 mm slices make one (1: the cases as they are)")
    args = ap.parse_args()
    cases_dir, cases = lab_cases(args.cases)
    run_model(args, cases_dir, cases, {f"{2 * f} mm": thick_variant(f) for f in args.factors},
              {"factors": args.factors})


if __name__ == "__main__":
    main()
