"""Would a volume statistic that counts every finding rank the lab's slabs better than the strongest finding alone?

The volume p-value (`DetectionResult.volume_p_value`) is P(a normal volume of this length has a finding as strong as
this one's strongest) under the calibrated Poisson rate of false findings. A lesion weaker than a slab's strongest
normal structure leaves it unchanged, so many lab cases tie with their normal slab. This experiment scores, for
each case, the multi-finding statistic

    min over thresholds t of P(N >= n(t)),  N ~ Poisson(fp_rate(t) * length),

where n(t) counts the findings (components of at least the minimum size) of the heatmap at probability t; at one
finding it is the strongest finding's p-value. It reports the slab AUROC of both statistics, over every calibrated
threshold and over halves of them, with the same cross-calibration as the lab. It is not used by `detect`.

For an ensemble it also scores the rule `detect` used before stop 30, the members' volume p-values combined (1 -
(1 - p_min)^M for max-rate, the minimum for max, the mean for mean), against its volume p-value now, the combined
map's strongest finding's under the ensemble's false-finding curve.

    python scripts/experiment_volume_statistic.py --cases runs/lab-cases --model chest-ct-vqvae-fs-256 --json OUT
    python scripts/experiment_volume_statistic.py --cases runs/lab-cases --model chest-ct-broad --json OUT

The cases come from chest_ct_01 (see ../shared/data/SOURCES.md for its provenance).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import poisson

from medanomaly.api import detect_volume
from medanomaly.calibration import FP_THRESHOLDS, count_components, min_voxels_for
from medanomaly.ensemble import Ensemble, calibration_of
from medanomaly.lab import cross_calibrated_cases
from medanomaly.metrics import roc_auc
from medanomaly.orientation import Reorientation


def members_combined(p_values: list[float], combine: str) -> float:
    """An ensemble's members' volume p-values combined as detect did before stop 30."""
    if combine == "max-rate":
        lowest = min(p_values)
        return 1.0 if lowest >= 1.0 else float(-np.expm1(len(p_values) * np.log1p(-lowest)))
    return float(np.min(p_values) if combine == "max" else np.mean(p_values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--model", default=None, help="catalog name or bundle folder (default: the default model)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for case, volume, scorer in cross_calibrated_cases(args.cases, args.model):
        r = Reorientation.for_image(volume.image)
        result = detect_volume(volume, scorer)
        cal = calibration_of(scorer)
        extent_cm = volume.hu.shape[r.axes[0]] * r.canonical_spacing[0] / 10.0
        min_voxels = min_voxels_for(cal.min_size_mm3, volume.voxel_volume_mm3)
        counts = []
        for t in getattr(cal, "fp_thresholds", FP_THRESHOLDS):  # an ensemble's curve: every card's thresholds
            n = count_components(result.significance >= -np.log10(1.0 - t), min_voxels)
            expected = cal.fp_rate(t) * extent_cm
            counts.append({"threshold": float(t), "findings": n, "expected": expected,
                           "log_p": float(poisson.logsf(n - 1, expected)) if n > 0 else 0.0})
        rows.append({"case": case["case"], "normal": bool(case["normal"]), "p_value": result.volume_p_value,
                     "counts": counts})
        if isinstance(scorer, Ensemble):
            members = [1.0 - v for v in result.settings["ensemble"]["member_volume_scores"]]
            rows[-1].update(members=members, members_combined=members_combined(members, scorer.combine))
        print(f"{case['case']}: p {result.volume_p_value:.4g}, multi-finding log p "
              f"{min(c['log_p'] for c in counts):.3f}" + (f", members combined {rows[-1]['members_combined']:.4g}"
                                                          if "members" in rows[-1] else ""), flush=True)
    labels = np.array([not row["normal"] for row in rows])
    strongest = np.log(np.maximum([row["p_value"] for row in rows], 1e-300))
    summary = {"strongest_finding": roc_auc(-strongest, labels)}
    if "members_combined" in rows[0]:
        combined = np.log(np.maximum([row["members_combined"] for row in rows], 1e-300))
        summary["members_combined"] = roc_auc(-combined, labels)
    for name, part in (("all_thresholds", slice(None)), ("even_thresholds", slice(0, None, 2)),
                       ("odd_thresholds", slice(1, None, 2))):
        multi = np.array([min(c["log_p"] for c in row["counts"][part]) for row in rows])
        summary[f"multi_finding_{name}"] = roc_auc(-multi, labels)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "slab_auroc": summary, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
