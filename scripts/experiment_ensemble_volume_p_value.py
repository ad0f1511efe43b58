"""Which volume p-value ranks an ensemble's lab cases better: its members' volume p-values combined (the rule before
stop 30: 1 - (1 - p_min)^M for max-rate, the minimum for max, the mean for mean), or the p-value of the combined
map's strongest finding under the ensemble's false-finding curve (what `detect` reports since stop 30)?

    python scripts/experiment_ensemble_volume_p_value.py --cases runs/lab-cases \
        --model ensemble-max-rate:chest-ct-vqvae-fs-256,chest-ct-shape-outlier,chest-ct-tube-outlier,chest-ct-deep-knn

Each slab's cases are scored with the ensemble recalibrated on the other slab's normal case, as in the lab. Prints
both slab AUROCs and writes every case's p-values with --json. The cases come from chest_ct_01 (see
../shared/data/SOURCES.md for its provenance).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medanomaly.api import detect_volume
from medanomaly.lab import cross_calibrated_cases
from medanomaly.metrics import roc_auc


def members_combined(p_values: list[float], combine: str) -> float:
    """The members' volume p-values combined as detect did before stop 30."""
    if combine == "max-rate":
        lowest = min(p_values)
        return 1.0 if lowest >= 1.0 else float(-np.expm1(len(p_values) * np.log1p(-lowest)))
    return float(np.min(p_values) if combine == "max" else np.mean(p_values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--model", required=True, help="an ensemble spec or a recommended ensemble's alias")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for case, volume, scorer in cross_calibrated_cases(args.cases, args.model):
        result = detect_volume(volume, scorer)
        members = [1.0 - s for s in result.settings["ensemble"]["member_volume_scores"]]
        rows.append({"case": case["case"], "normal": bool(case["normal"]), "map": result.volume_p_value,
                     "members_combined": members_combined(members, scorer.combine), "members": members})
        print(f"{case['case']}: map {result.volume_p_value:.4g}, members combined {rows[-1]['members_combined']:.4g} "
              f"(members {', '.join(f'{p:.3g}' for p in members)})", flush=True)
    labels = np.array([not row["normal"] for row in rows])
    summary = {key: roc_auc(-np.log(np.maximum([row[key] for row in rows], 1e-300)), labels)
               for key in ("map", "members_combined")}
    print(json.dumps({"slab_auroc": summary}))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "slab_auroc": summary, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
