"""The anomaly lab benchmark: build cases from the real CTs in ../shared/data/ct, run every detector present plus
the baselines, and print one table of quality and speed.

    python scripts/benchmark_lab.py [--cases DIR] [--rebuild] [--models NAME ...]

A second case set in another folder, with other lesions drawn at other places (the same held-out slabs and
normal cases), narrows the intervals of the sensitivities the lab measures, for example of nodules:

    python scripts/benchmark_lab.py --cases runs/lab-nodules --seed 2027 --kinds nodule_solid:6 nodule_solid:8 ...

Leakage: the chest models are trained on chest_ct_01, the only chest patient. Its slices are split by slab
(medanomaly.training.data.slab_split: 20-slice blocks, every third held out, 3-slice margins); only the held-out
slabs become lab cases, and each model's card records that split. Those held-out slabs also calibrated the shipped
models, so by default each slab's cases are scored with the model recalibrated on the other slab's normal case.
"""

import argparse
import json
import sys
from pathlib import Path

from medanomaly.bundle import list_models, resolve_model
from medanomaly.calibration import contiguous_runs
from medanomaly.ensemble import parse_spec
from medanomaly.lab import (TARGET_SUBSETS, build_cases, evaluate, intervals, markdown_breakdown, markdown_table,
                            pooled_localization, record_in_card)
from medanomaly.synth import LESION_KINDS
from medanomaly.training.data import slab_split

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
CHEST_KINDS = ["nodule_solid:4", "nodule_solid:6", "nodule_solid:8", "nodule_solid:12", "nodule_solid:20",
               "nodule_solid:28", "nodule_part_solid:10", "nodule_part_solid:20", "ggo", "consolidation",
               "needle", "needle", "effusion", "mood_intensity", "mood_noise", "mood_deformation", "mood_mirror"]
SEED = 2026


def chest_heldout_slabs(n_slices: int = 141) -> list[tuple[int, int]]:
    _, held = slab_split(n_slices, block=20, every=3, margin=3)
    return [(int(run[0]), int(run[-1]) + 1) for run in contiguous_runs(held)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default=str(ROOT / "runs" / "lab-cases"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--kinds", nargs="+", default=CHEST_KINDS, metavar="KIND[:MM]",
                    help="lesions of a new case set, one case per kind and slab (default: the lab's 17)")
    ap.add_argument("--seed", type=int, default=SEED, help="of a new case set's lesions (default: the lab's)")
    ap.add_argument("--models", nargs="*", default=None,
                    help="catalog names or bundle folders (default: every model in the catalogs)")
    ap.add_argument("--json", default=str(ROOT / "scripts" / "results" / "lab_benchmark.json"))
    ap.add_argument("--calibration", choices=("auto", "cross", "card"), default="auto",
                    help="cross (auto's choice here): each slab's cases are scored with the model recalibrated on the "
                         "other slab's normal case, because the shipped models calibrate on these held-out slabs")
    ap.add_argument("--write-cards", action="store_true",
                    help="write each bundle's headline numbers into its model card (evaluation.lab)")
    ap.add_argument("--from-json", nargs="+", metavar="FILE",
                    help="print the tables of stored results (with their 95%% intervals) instead of evaluating")
    args = ap.parse_args()
    if args.from_json:
        results = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
        for r in results:
            r.setdefault("intervals_95", intervals(r))  # results stored before the lab computed them
        report(results)
        return
    unknown = [k for k in args.kinds if k.partition(":")[0] not in LESION_KINDS]
    if unknown:
        ap.error(f"unknown lesion kinds {unknown}; use {', '.join(LESION_KINDS)}, optionally with :DIAMETER_MM")
    cases = Path(args.cases)
    if args.rebuild or not (cases / "cases.json").exists():
        chest = SHARED_CT / "chest_ct_01.nii.gz"
        if not chest.exists():
            sys.exit(f"{chest} is absent: the lab builds its cases from ../shared/data/ct")
        if (cases / "cases.json").exists():
            (cases / "cases.json").unlink()
        build_cases(chest, chest_heldout_slabs(), args.kinds, cases, seed=args.seed, name="chest01",
                    group_note="held-out slabs of the only chest patient (slab split with 3-slice margins)")
    built = json.loads((cases / "cases.json").read_text())["sources"][0]
    if (built["kinds"], built["seed"]) != (args.kinds, args.seed):
        sys.exit(f"{cases} holds cases of other lesions (seed {built['seed']}, {len(built['kinds'])} kinds); give "
                 "their --kinds and --seed, another --cases folder, or --rebuild")
    names = args.models or [m["name"] for m in list_models()]
    results = []
    for name in names:
        print(f"evaluating {name} ...", file=sys.stderr, flush=True)
        results.append(evaluate(cases, name, calibration=args.calibration))
        if args.write_cards and parse_spec(name) is None:
            record_in_card(resolve_model(name).path, results[-1])
    report(results)
    write_results(results, args.json)


# what an experiment's one-line summary per model gives (the whole result is in its JSON)
SUMMARY_KEYS = ("volume_auroc", "voxel_ap", "froc", "findings_froc", "target_sensitivity_at_2fp",
                "target_sensitivity_at_2fp_findings", "fp_findings_per_normal_volume")


def write_results(results: list[dict], path, summary: bool = False) -> None:
    """The lab's results as JSON at `path` (the format `--from-json` reads); with `summary`, also one line per model
    on stdout: its name and SUMMARY_KEYS."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=float) + "\n")
    if summary:
        for result in results:
            print(result["model"]["name"], json.dumps({k: result[k] for k in SUMMARY_KEYS if k in result},
                                                      default=float))


def report(results: list[dict]) -> None:
    """The lab's tables and per-detector lines on stdout."""
    print(markdown_table(results))
    print()
    print(markdown_breakdown(results))
    print()

    def targets(r: dict, key: str) -> str:  # each target subset's sensitivity with its 95% interval
        return "; ".join(f"{name} {t['sensitivity']:.2f} (of {t['lesions']}; 95% interval "
                         f"{r['intervals_95'][key][name][0]:.2f}-{r['intervals_95'][key][name][1]:.2f})"
                         for name, t in r.get(key, {}).items())

    for r in results:
        name = r["model"]["name"]
        print(f"{name}: localization on needle and fluid (effusion) slices {pooled_localization(r):.2f}")
        print(f"{name}: sensitivity at 2 false positives per slab, {targets(r, 'target_sensitivity_at_2fp')}")
        print(f"{name}: the same with detect's findings at every level, "
              f"{targets(r, 'target_sensitivity_at_2fp_findings')}")
        low, high = r["intervals_95"]["froc_at_2fp"]
        print(f"{name}: all lesions at 2 false positives per slab {r['froc']['2.0']:.2f} (95% interval "
              f"{low:.2f}-{high:.2f})")
        if "lesions_at_2fp" in r:  # results since stop 29 name the target lesions missed
            missed = [lesion for lesion in r["lesions_at_2fp"]["lesions"] if not lesion["found"]
                      and any(subset(lesion) for subset in TARGET_SUBSETS.values())]
            print(f"{name}: target lesions missed at 2 false positives per slab: "
                  + (", ".join(f"{m['case']} ({m['kind']} {m['diameter_mm']:g} mm, "
                               + (f"best candidate {m['best']:.2f})" if m["best"] >= 0 else "no candidate)")
                               for m in missed) or "none"))


if __name__ == "__main__":
    main()
