"""Does deep kNN depend on the scale its backbone was trained at?

The shipped `chest-ct-deep-knn` (0.3.0) keeps its memory at 256^2 (1.75 mm pixels) but its SimSiam weights were
trained for 1500 steps at 128^2 (3.5 mm), the budget of 2 CPU cores. Each variant here trains SimSiam from scratch at
another scale, then builds the memory with the shipped model's settings (backbone patch features at 256^2, density
normalization over +-5 slices), so its lab row compares directly with the shipped model's:

- `256-1500`: SimSiam at 256^2 for the same 1500 steps (train at the memory's own scale; a GPU recipe);
- `256-long`: SimSiam at 256^2 for 12000 steps (and 8x the steps; a GPU recipe);
- `64-1500`: SimSiam at 64^2 (7 mm pixels) for 1500 steps (coarser still than the shipped 128^2; minutes on a CPU).

A variant trained at 256^2 is one recipe. One trained at another scale is two, as the shipped model is: SimSiam and
its own memory (`deep-knn-simsiam-NAME`, an intermediate), then the memory at 256^2 from its weights.

    python scripts/train_simsiam_variants.py --only 64-1500          # where the CTs are
    # the 256^2 variants' steps on a GPU node:
    python scripts/train_default_models.py --only chest-ct-vqvae-fs-256 --prepare-slices slices.safetensors  # 256^2
    python scripts/train_simsiam_variants.py --only 256-1500 --slices slices.safetensors --steps-only --output DIR
    # copy DIR/deep-knn-NAME.checkpoint to runs/simsiam/, then, where the CTs are:
    python scripts/train_simsiam_variants.py --only 256-1500 --resume   # memory and calibration
    python scripts/benchmark_lab.py --models chest-ct-deep-knn runs/simsiam/deep-knn-256-1500 ...

`--steps N` with `--resume` finishes a variant at the N steps its checkpoint reached (for a GPU run cut short); the
card records the steps that ran.
"""

import argparse
import logging
from pathlib import Path

from medanomaly.preprocess import InputSpec
from medanomaly.training.data import SliceBuffer
from train_default_models import CHEST_INPUT, RECIPES, train_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = RECIPES["chest-ct-deep-knn"]  # memory at 256^2 from the weights of RECIPES["chest-ct-deep-knn-simsiam"]
MEMORY_SIZE = SHIPPED["input"]["size"]
VARIANTS = {"256-1500": (256, 1500), "256-long": (256, 12000), "64-1500": (64, 1500)}  # SimSiam size, steps


def simsiam_recipe(size: int) -> dict:
    grid = dict(CHEST_INPUT, size=size, spacing_mm=CHEST_INPUT["size"] * CHEST_INPUT["spacing_mm"] / size)
    return dict(RECIPES["chest-ct-deep-knn-simsiam"], input=grid, checkpoint_every=500,
                architecture=SHIPPED["architecture_overrides"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(VARIANTS), default=None)
    ap.add_argument("--output", default=str(ROOT / "runs" / "simsiam"))
    ap.add_argument("--steps", type=int, default=None, help="override the variant's steps (see above)")
    ap.add_argument("--slices", metavar="FILE", help="prepared training slices at the variant's SimSiam grid")
    ap.add_argument("--steps-only", action="store_true", help="stop after the gradient steps (keep the checkpoint)")
    ap.add_argument("--resume", action="store_true", help="continue from each variant's checkpoint")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for variant, (size, steps) in VARIANTS.items():
        if args.only and args.only != variant:
            continue
        recipe = simsiam_recipe(size)
        extra = {}
        if args.slices:
            extra["slices"] = SliceBuffer.load(args.slices, InputSpec.from_card(recipe["input"]), seed=recipe["seed"])
        ran = args.steps or steps
        schedule = "" if ran == steps else f" of a {steps}-step cosine schedule (the GPU run stopped at its limit)"
        name = f"deep-knn-{variant}"
        trained = f"Deep kNN with SimSiam trained from scratch at {size}^2 for {ran} steps{schedule} (batch " \
                  f"{recipe['batch_size']}, learning rate {recipe['learning_rate']})"
        memory = f"the shipped model's memory settings: backbone patch features at {MEMORY_SIZE}^2, density " \
                 "normalization over +-5 slices (chest_ct_01, slab split; scripts/train_simsiam_variants.py)"
        first = name if size == MEMORY_SIZE else f"deep-knn-simsiam-{variant}"
        own = f"{trained}, then {memory}" if first == name else f"{trained}, with its own memory at {size}^2 " \
            f"(the first step of {name})"
        bundle = train_recipe(first, recipe, out / first, resume=args.resume, finish=not args.steps_only, steps=ran,
                              description=own, **extra)
        if bundle is not None and size != MEMORY_SIZE:  # the memory at the shipped grid from these weights
            bundle = train_recipe(name, dict(SHIPPED, init_from=first, version="0.1.0"), out / name, models=out,
                                  description=f"{trained}; {memory}")
        print(f"{name}: {'checkpoint written' if bundle is None else bundle.path}", flush=True)


if __name__ == "__main__":
    main()
