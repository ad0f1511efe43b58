"""Lower-dose CT: how do false findings, lesion findings and the reference check change when a scan is noisier than
the one the model was trained and calibrated on?

CT noise std grows as 1/sqrt(dose). No lower-dose scan of a real CT was available, so this script adds noise to the
anomaly lab's cases as a dose reduction would: independent Gaussian noise in every slice, correlated in-plane as the
scan's own noise is, of std sigma0 * sqrt(1 / dose - 1), so that the total is sigma0 / sqrt(dose). sigma0 and the
correlation are measured on the first normal slab's soft tissue (`lab_variants.measure_noise`). Real
low-dose scans also show streaks and a noise that varies with the patient's thickness, which this does not model.

Each lab slab (2 normal 20-slice slabs of `chest_ct_01` and 34 with one inserted lesion) is scored against a
calibration fitted on the *other* slab's normal case at full dose (the lab's cross-calibration), at the default
sensitivity, with the same noise for every dose's case (one seed per case, scaled).

    python scripts/benchmark_dose.py --cases runs/lab-cases --json scripts/results/benchmark_dose.json
"""

from __future__ import annotations


import numpy as np
from lab_variants import Variant, first_normal_noise, lab_cases, lab_parser, lesion_mask, run_model

from medanomaly.synth import thinner_slices


def dose_variant(dose: float, noise: dict) -> Variant:
    """The case with noise added as `dose` of the recorded dose would have; the same grid and lesion mask."""
    added = noise["noise_std_hu"] * np.sqrt(1.0 / dose - 1.0)

    def make(image, labels, index):
        noisy = thinner_slices(image, 1, added, noise["noise_sigma_px"], seed=index) if added > 0 else image
        return noisy, lesion_mask(labels)
    return make


def main() -> None:
    ap = lab_parser(__doc__)
    ap.add_argument("--doses", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                    help="fractions of the recorded dose (1: the cases as they are)")
    args = ap.parse_args()
    cases_dir, cases = lab_cases(args.cases)
    noise = first_normal_noise(cases_dir, cases)
    run_model(args, cases_dir, cases, {f"dose {dose:g}": dose_variant(dose, noise) for dose in args.doses},
              {"noise": noise, "doses": args.doses,
               "added_noise_std_hu": {f"dose {d:g}": round(noise["noise_std_hu"] * np.sqrt(1.0 / d - 1.0), 2)
                                      for d in args.doses}})


if __name__ == "__main__":
    main()
