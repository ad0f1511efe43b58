"""How often does detect's reference check warn, on normal, lesion and other-region CT?

The check (`calibration.Calibration.unlike_reference`, reported by `detect` in `findings.json` as `reference_check`
and as a warning) marks a slice whose share of tissue above the 99th percentile of normal is at least 1.5 times the
highest share of any normal reference slice. This script counts the marked slices:

- on the anomaly lab's 36 cases, each slab checked against a calibration fitted on the *other* slab's normal case
  (the lab's cross-calibration), so that the two normal slabs are out of sample: slices marked there are false
  warnings;
- on whole CTs with the models' own calibration: `chest_ct_01` (the training patient: its training slices and its
  held-out slabs) and the two abdomen CTs (another body region than the chest models were trained on).

    python scripts/benchmark_reference_check.py --cases runs/lab-cases --models chest-ct-vqvae-fs-256 \\
        chest-ct-deep-knn --json scripts/results/benchmark_reference_check.json
"""

import argparse
import json
from pathlib import Path

from medanomaly.api import detect_volume
from medanomaly.calibration import REFERENCE_LEVEL, UNLIKE_FACTOR
from medanomaly.ensemble import load_scorer
from medanomaly.lab import MANIFEST, cross_calibrated
from medanomaly.volumes import read_volume

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"


def check(volume, scorer) -> dict:
    record = detect_volume(volume, scorer).reference_check
    if not record.get("available"):
        raise SystemExit(f"{scorer.card['name']}: its calibration has no reference check; recalibrate it with "
                         "`medanomaly calibrate`")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="the lab's cases (scripts/benchmark_lab.py builds them)")
    ap.add_argument("--models", nargs="+", required=True, help="catalog names or bundle folders")
    ap.add_argument("--ct", nargs="*", default=None,
                    help="whole CTs checked with the card's calibration (default: every CT in ../shared/data/ct)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases_dir = Path(args.cases)
    cases = json.loads((cases_dir / MANIFEST).read_text())["cases"]
    cts = args.ct if args.ct is not None else sorted(str(p) for p in SHARED_CT.iterdir())
    out = {"factor_and_level": [UNLIKE_FACTOR, REFERENCE_LEVEL], "models": {}}
    for name in args.models:
        scorer = load_scorer(name)
        crossed = cross_calibrated(scorer, cases_dir, cases)
        rows = []
        for case in cases:
            record = check(read_volume(cases_dir / case["volume"]), crossed[case["group"]])
            rows.append({"case": case["case"], "normal": bool(case["normal"]), **record})
        whole = []
        for path in cts:
            record = check(read_volume(path), scorer)
            whole.append({"ct": Path(path).name, **record})
        summary = {}
        for label, chosen in (("normal slabs (out of sample)", [r for r in rows if r["normal"]]),
                              ("lesion cases", [r for r in rows if not r["normal"]])):
            summary[label] = {"cases": len(chosen), "cases_warned": sum(r["slices_unlike"] > 0 for r in chosen),
                              "slices_unlike": sum(r["slices_unlike"] for r in chosen),
                              "slices_checked": sum(r["slices_checked"] for r in chosen),
                              "warned": [r["case"] for r in chosen if r["slices_unlike"]]}
        for r in whole:
            summary[r["ct"]] = {"slices_unlike": r["slices_unlike"], "slices_checked": r["slices_checked"],
                                "max_ratio": r["max_ratio"]}
        out["models"][scorer.card["name"]] = {"version": scorer.card["version"], "summary": summary, "lab": rows,
                                              "ct": whole}
        cells = [f"{v['slices_unlike']}/{v['slices_checked']}"
                 + (f" ({v['cases_warned']} of {v['cases']} cases)" if "cases" in v else f" (max {v['max_ratio']}x)")
                 for v in summary.values()]
        print(f"| {scorer.card['name']} {scorer.card['version']} | " + " | ".join(cells) + " |", flush=True)
    print("columns: " + " | ".join(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
