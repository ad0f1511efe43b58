"""Would the shape outlier find more nodules on the pleura if its response were spread along the slices too?

The shape outlier spreads each scale's response over the disc of the blob it answers (a square maximum filter in the
slice, radius sigma * sqrt(3)), but not across slices: a nodule's response above a level can then be a few pixels
in one or two slices, below the minimum finding size (65 mm3), though its peak is high. On the pleural set a 10 mm
nodule peaks at significance 6.2 in the three-model ensemble, above all but one structure of its normal slab, yet only
14 voxels (27 mm3) of it reach the lab's base level, so it leaves no candidate. This experiment spreads the shape
outlier's raw map along the slices as well (a maximum over +-N model slices, inside its region) before the 3D
smoothing, for calibration and detection alike, and scores the lab with the lab's cross calibration. It is not used
by `detect`.

    python scripts/experiment_z_spread.py --cases runs/lab-pleural --model chest-ct-nodules-needles --slices 2 \\
        --json OUT

The cases come from chest_ct_01 (see ../shared/data/SOURCES.md for its provenance).
"""

import argparse

from scipy import ndimage as ndi

from benchmark_lab import write_results

import medanomaly.engine as engine
from medanomaly.lab import evaluate

SPREAD_MEMBER = "chest-ct-shape-outlier"


def spread_along_slices(slices_each_side: int):
    """Make the engine spread SPREAD_MEMBER's raw map over +-`slices_each_side` model slices (a maximum filter along
    the slice axis, inside the region) before the 3D smoothing that calibration and detection both see."""
    run = engine.run_detector

    def run_spread(detector, slices, **kwargs):
        raw, recon, timings = run(detector, slices, **kwargs)
        if detector.card["name"] == SPREAD_MEMBER and slices_each_side > 0:
            raw = ndi.maximum_filter1d(raw, 2 * slices_each_side + 1, axis=0, mode="constant") * slices.region
        return raw, recon, timings

    engine.run_detector = run_spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--model", default="chest-ct-nodules-needles")
    ap.add_argument("--slices", type=int, default=2, help="model slices on each side to spread over")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    spread_along_slices(args.slices)
    result = evaluate(args.cases, args.model)
    result["model"] = dict(result["model"], name=result["model"]["name"] + f" [{SPREAD_MEMBER} spread over "
                                                                          f"+-{args.slices} slices]")
    write_results([result], args.json, summary=True)


if __name__ == "__main__":
    main()
