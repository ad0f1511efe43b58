"""Would an ensemble combine its members better by Fisher's method than by the maximum?

`ensemble-max-rate:` matches each member's significance map to a common false-finding rate and takes the voxel-wise
maximum, so a lesion counts only by its strongest member. Fisher's method combines independent p-values by the sum of
their -log p; on the matched significance maps (-log10 of each voxel's tail probability) that is their mean. A
nodule that the flagship and the shape outlier both flag moderately then outranks a normal structure that only one
member flags. The mean of matched maps has no false-finding rate that follows from the members' (the union bound of
`ensemble-max-rate` holds only for the maximum), so this experiment fits one, as a single model's calibration is fit:
for each case group, on the mean maps of the other groups' normal cases (the lab's cross calibration), with the
members themselves recalibrated as the lab always does. It scores the lab with both rules in one run. It is not used
by `detect`.

    python scripts/experiment_ensemble_fisher.py --cases runs/lab-pleural --model chest-ct-nodules-needles --json OUT

The cases come from chest_ct_01 (see ../shared/data/SOURCES.md for its provenance).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from benchmark_lab import write_results
from medanomaly.api import detect_volume
from medanomaly.calibration import Calibration
from medanomaly.ensemble import Ensemble, EnsembleCalibration, elementwise, load_scorer, maximum_with_source
from medanomaly.lab import MANIFEST, cross_calibrated, evaluate
from medanomaly.volumes import read_volume


class FisherEnsemble(Ensemble):
    """The members matched by rate as in max-rate, combined by the mean of their matched significance; once
    `fit_fisher` has replaced the union-bound calibration with one fitted on normal CT's mean maps, that mean is
    calibrated by it."""

    def combine_maps(self, maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raw = elementwise(np.add, maps) / np.float32(len(maps))
        source = maximum_with_source(maps)[1]
        if isinstance(self.calibration, EnsembleCalibration):  # not fitted yet: the raw mean, for fit_fisher
            return raw, source
        return self.calibration.voxel_significance(raw, raw > 0), source


def fisher_from(matched: Ensemble) -> FisherEnsemble:
    """A Fisher ensemble of the same (recalibrated) members, matched by the same rates, not yet calibrated."""
    fisher = FisherEnsemble(matched.members, "max-rate")
    fisher.card = dict(matched.card, name=matched.card["name"].replace("ensemble-max-rate", "ensemble-fisher-rate"))
    return fisher


def fit_fisher(fisher: FisherEnsemble, normal_paths: list[Path]) -> None:
    """Fit the ensemble's calibration on its uncalibrated mean maps of normal volumes (as Calibration.fit fits a
    model's on its smoothed scores), then use it."""
    references = []
    for path in normal_paths:
        volume = read_volume(path)
        raw = detect_volume(volume, fisher, device="cpu").significance
        references.append((raw, raw > 0, tuple(np.asarray(volume.image.GetSpacing(), float)[::-1])))
    members = fisher.calibration.members
    fisher.calibration = Calibration.fit(references, min_size_mm3=min(c.min_size_mm3 for c in members),
                                         default_fp_per_volume=float(np.mean([c.default_fp_per_volume
                                                                              for c in members])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--model", default="chest-ct-nodules-needles", help="an ensemble-max-rate ensemble")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    cases_dir = Path(args.cases)
    scorer = load_scorer(args.model)
    if not isinstance(scorer, Ensemble) or scorer.combine != "max-rate":
        ap.error(f"--model {args.model}: give an ensemble-max-rate ensemble")
    cases = json.loads((cases_dir / MANIFEST).read_text())["cases"]
    matched = cross_calibrated(scorer, cases_dir, cases)
    fishers = {}
    for group, ensemble in matched.items():
        fishers[group] = fisher_from(ensemble)
        fit_fisher(fishers[group], [cases_dir / c["volume"] for c in cases if c["normal"] and c["group"] != group])
    results = [evaluate(cases_dir, scorer, scorers=matched, calibration_note="cross-group (ensemble-max-rate)")]
    results.append(evaluate(cases_dir, scorer, scorers=fishers, calibration_note=(
        "cross-group: members recalibrated as for ensemble-max-rate, and the mean of their matched maps calibrated on "
        "the other groups' normal cases")))
    results[-1]["model"] = dict(results[-1]["model"], name=next(iter(fishers.values())).card["name"])
    write_results(results, args.json, summary=True)


if __name__ == "__main__":
    main()
