"""Does stronger regularization of the 256^2 default's stage 2 cut its false alarms on unseen normal anatomy?

scripts/diagnose_flagship.py found the token classifier to be what limits small lesions: 3.6% and 6.5% of the body
tokens of the held-out normal slabs reach probability 0.5, above most 6-10 mm nodules. The classifier has learned
positional embeddings and saw 89 slices of one patient, so it may have learned which codes are normal *where*
rather than which arrangements are normal. Continuations of version 0.1.0 of the default
(`chest-ct-vqvae-fs-256-stage2` in train_default_models.py), each for the same stage-2 steps, seed and learning rate:

- `control`: the default's settings (rotation 7 degrees, scaling 8%, shift 5%, no dropout);
- `regularized`: rotation 15 degrees, scaling 15%, shift 10% and dropout 0.1 in the transformer;
- `augment-only`: the same augmentation without dropout;
- `strong`: rotation 20 degrees, scaling 20%, shift 15% and dropout 0.2.

The control separates the effect of the settings from that of more steps; it is what version 0.2.0 of the default
became (scripts/results/lab_benchmark_256_regularization.json).

    python scripts/train_regularization_256.py --only control --slices FILE --steps-only --output DIR   # on a GPU
    # copy DIR/vqvae-fs-256-NAME.checkpoint to runs/regularization/, then, where the CTs are:
    python scripts/train_regularization_256.py --resume     # calibrates each on the held-out slabs
    python scripts/benchmark_lab.py --models chest-ct-vqvae-fs-256 runs/regularization/*

`--init-from chest-ct-vqvae-fs-256 --learning-rate 1.25e-4 --steps 2000 --only control --output runs/longer` asks
whether the shipped default (0.2.0) gains from still more steps.
`--init-from chest-ct-vqvae-fs-256-context --learning-rate 5e-4 --steps 4000 --only control --output
runs/context-longer` asks the same of the 2.5D CPU model (its input, context included, comes from the bundle).
"""

import argparse
import logging
from pathlib import Path

from medanomaly.bundle import ModelBundle
from medanomaly.preprocess import InputSpec
from medanomaly.training.data import SliceBuffer
from train_default_models import MODELS, RECIPES, train_recipe

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "control": {},
    "regularized": {"augment_rotation_deg": 15.0, "augment_scale": 0.15, "augment_shift": 0.10,
                    "classifier_dropout": 0.1},
    "augment-only": {"augment_rotation_deg": 15.0, "augment_scale": 0.15, "augment_shift": 0.10},
    "strong": {"augment_rotation_deg": 20.0, "augment_scale": 0.20, "augment_shift": 0.15, "classifier_dropout": 0.2},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(VARIANTS), default=None)
    ap.add_argument("--output", default=str(ROOT / "runs" / "regularization"))
    ap.add_argument("--steps", type=int, default=4000, help="stage-2 steps of each continuation")
    ap.add_argument("--init-from", default=None, help="the bundle in models/ to continue (default: the recipe's, "
                    "chest-ct-vqvae-fs-256-stage2, which is version 0.1.0 of the default)")
    ap.add_argument("--learning-rate", type=float, default=None, help="default: the recipe's (2.5e-4)")
    ap.add_argument("--slices", metavar="FILE", help="prepared training slices (train_default_models.py "
                    "--only chest-ct-vqvae-fs-256 --prepare-slices FILE)")
    ap.add_argument("--steps-only", action="store_true", help="stop after the gradient steps (keep the checkpoint)")
    ap.add_argument("--resume", action="store_true", help="continue from each variant's checkpoint")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = dict(RECIPES["chest-ct-vqvae-fs-256"])
    if args.init_from:  # a continuation keeps the input its weights were trained on (a 2.5D bundle's context)
        base["init_from"] = args.init_from
        base["input"] = ModelBundle.load(MODELS / args.init_from).card["input"]
    if args.learning_rate:
        base["learning_rate"] = args.learning_rate
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    extra = {}
    if args.slices:  # read once; each run draws its batches from them with the recipe's seed
        extra["slices"] = SliceBuffer.load(args.slices, InputSpec.from_card(base["input"]), seed=base["seed"])
    for variant, overrides in VARIANTS.items():
        if args.only and args.only != variant:
            continue
        name = f"vqvae-fs-256-{variant}"
        bundle = train_recipe(
            name, base, out / name, models=MODELS, resume=args.resume, finish=not args.steps_only,
            steps=args.steps, architecture_overrides={**base["architecture_overrides"], **overrides},
            description=f"{base['init_from']} continued for {args.steps} stage-2 steps at learning rate "
                        f"{base['learning_rate']} with {overrides or 'its own settings'} "
                        "(scripts/train_regularization_256.py)",
            **extra)
        print(f"{name}: {'checkpoint written' if bundle is None else bundle.path}", flush=True)


if __name__ == "__main__":
    main()
