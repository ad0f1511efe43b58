"""Would the outliers' calibration be better on more normal CT: the training slices as well as the held-out slabs?

The shape and tube outliers learn no network: their "training" is one high quantile of normal response per tissue
class. Their false-finding rates could therefore be counted on the training slices too (89 slices of chest_ct_01,
against 20 in the other held-out slab that the lab's cross-calibration leaves them), as they could not for a network,
which has seen those slices. This experiment scores the lab with the named members recalibrated, for every group, on
the other groups' normal cases plus the training slabs of the source CT (the slab split that training uses), and the
other members as the lab always does. It is not used by `detect`.

    python scripts/experiment_calibration_data.py --cases runs/lab-pleural --model chest-ct-nodules-needles \\
        --members chest-ct-shape-outlier chest-ct-tube-outlier --json OUT

The cases and the training slices come from chest_ct_01 (see ../shared/data/SOURCES.md for its provenance).
"""

import argparse
import json
from pathlib import Path

from benchmark_lab import write_results
from medanomaly.engine import pick_device, score_slices
from medanomaly.ensemble import Ensemble, load_scorer
from medanomaly.lab import MANIFEST, cross_calibrated, evaluate
from medanomaly.training import slab_references
from medanomaly.training.data import load_sources

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz"


def training_references(detector, source: Path) -> list:
    """(smoothed scores, region, spacing) of each training slab of `source`, scored as calibration scores the
    held-out slabs (the whole volume at once, then cut)."""
    (volume,) = load_sources([str(source)], detector.spec, split=True)
    smoothed, _, _ = score_slices(detector, volume.slices, device=pick_device("cpu"))
    return slab_references(smoothed, volume.slices, volume.train_z)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--members", nargs="+", required=True, help="members (catalog names) also calibrated on the "
                                                                "training slabs")
    ap.add_argument("--source", default=str(SOURCE), help="the CT whose training slabs are added")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    scorer = load_scorer(args.model)
    members = scorer.members if isinstance(scorer, Ensemble) else [scorer]
    extra = {i: training_references(m, Path(args.source)) for i, m in enumerate(members)
             if m.card["name"] in args.members}
    if len(extra) != len(args.members):
        ap.error(f"--members: not all of {args.members} are members of {args.model}")
    cases = json.loads((Path(args.cases) / MANIFEST).read_text())["cases"]
    scorers = cross_calibrated(scorer, Path(args.cases), cases, extra_references=extra)
    slabs = {members[i].card["name"]: len(refs) for i, refs in extra.items()}
    result = evaluate(args.cases, scorer, scorers=scorers, calibration_note=(
        "cross-group, and the members " + ", ".join(f"{n} (+{k} training slabs)" for n, k in slabs.items())
        + " also on the training slabs of " + Path(args.source).name))
    write_results([result], args.json, summary=True)


if __name__ == "__main__":
    main()
