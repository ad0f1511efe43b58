"""Does deep kNN gain from a backbone trained self-supervised at 256^2, or for longer?

The shipped `chest-ct-deep-knn` (0.3.0) keeps its memory at 256^2 (1.75 mm pixels) but its SimSiam weights were
trained for 1500 steps at 128^2 (3.5 mm), the budget of 2 CPU cores. On a GPU both can change. Each variant here is
a whole deep-kNN recipe, SimSiam from scratch and then the memory with the shipped model's settings (backbone patch
features, density normalization over +-5 slices), so its lab row compares directly with the shipped model's:

- `256-1500`: SimSiam at 256^2 for the same 1500 steps (the effect of resolution alone);
- `256-long`: SimSiam at 256^2 for 12000 steps (resolution and 8x the steps).

    python scripts/train_default_models.py --only chest-ct-vqvae-fs-256 --prepare-slices slices.safetensors  # 256^2
    python scripts/train_simsiam_variants.py --slices slices.safetensors --steps-only --output DIR   # on a GPU
    # copy DIR/deep-knn-NAME.checkpoint to runs/simsiam/, then, where the CTs are:
    python scripts/train_simsiam_variants.py --resume     # memory and calibration on the held-out slabs
    python scripts/benchmark_lab.py --models chest-ct-deep-knn runs/simsiam/deep-knn-256-1500 ...

`--steps N` with `--resume` finishes a variant at the N steps its checkpoint reached (for a GPU run cut short); the
card records the steps that ran.
"""

import argparse
import logging
from pathlib import Path

from medanomaly.preprocess import InputSpec
from medanomaly.training.data import SliceBuffer
from train_default_models import CHEST_INPUT_256, RECIPES, train_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = RECIPES["chest-ct-deep-knn"]
BASE = dict(RECIPES["chest-ct-deep-knn-simsiam"], input=CHEST_INPUT_256, checkpoint_every=500,
            architecture=SHIPPED["architecture_overrides"])
VARIANTS = {"256-1500": 1500, "256-long": 12000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(VARIANTS), default=None)
    ap.add_argument("--output", default=str(ROOT / "runs" / "simsiam"))
    ap.add_argument("--steps", type=int, default=None, help="override the variant's steps (see above)")
    ap.add_argument("--slices", metavar="FILE", help="prepared 256^2 training slices")
    ap.add_argument("--steps-only", action="store_true", help="stop after the gradient steps (keep the checkpoint)")
    ap.add_argument("--resume", action="store_true", help="continue from each variant's checkpoint")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    extra = {}
    if args.slices:
        extra["slices"] = SliceBuffer.load(args.slices, InputSpec.from_card(BASE["input"]), seed=BASE["seed"])
    for variant, steps in VARIANTS.items():
        if args.only and args.only != variant:
            continue
        ran = args.steps or steps
        schedule = "" if ran == steps else f" of a {steps}-step cosine schedule (the GPU run stopped at its limit)"
        name = f"deep-knn-{variant}"
        bundle = train_recipe(
            name, BASE, out / name, resume=args.resume, finish=not args.steps_only, steps=ran,
            description=f"Deep kNN with SimSiam trained from scratch at 256^2 for {ran} steps{schedule} (batch "
                        f"{BASE['batch_size']}, learning rate {BASE['learning_rate']}), then the shipped model's "
                        "memory settings: backbone patch features at 256^2, density normalization over +-5 slices "
                        "(chest_ct_01, slab split; scripts/train_simsiam_variants.py)",
            **extra)
        print(f"{name}: {'checkpoint written' if bundle is None else bundle.path}", flush=True)


if __name__ == "__main__":
    main()
