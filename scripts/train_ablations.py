"""Ablations of the flagship (chest-ct-vqvae-fs), for the lab benchmark:

- random tokens instead of salient ones (stage 2 retrained from the flagship's stage-1 VQ-VAE);
- no residual weighting of the corrupted-token loss (likewise);
- the classifier map alone instead of map x residual (same weights, recalibrated), for the 128^2 flagship and the
  256^2 default;
- for the 256^2 default, the token probability sharpened (probability ** 2 or ** 4 x residual, recalibrated): do
  confident tokens alone (needles reach probability 0.88-1.0) make a better map?
- for the 256^2 default and the 2.5D CPU model, the token probability averaged over two token grids offset by half
  a token (`grid_offsets` 2, recalibrated): are small lesions that straddle token borders found?
- for the CPU model with 7 mm tokens (chest-ct-vqvae-fs-256-fine, trained by train_default_models.py --only into
  --fine-model's folder), the classifier over overlapping 24x24-token windows (`detection_window` 24, as in training)
  instead of the whole 64x64 grid, which costs 4096-token attention per slice;
- for the 256^2 default, in-plane line means (input `line_mm` 3 and 5: the map is the larger of the 3D smoothing and
  the best straight-line mean, recalibrated): do needles survive where the 3D smoothing erases them?

And of StyleGAN2: the same bundle scored by per-patch MSE instead of the Wasserstein distance (recalibrated).

And of the deep kNN detector (same SimSiam weights, memory rebuilt and recalibrated, no gradient steps):

- patch features after the adaptor (the SimSiam projector) instead of the backbone's; and with them, without the
  in-plane position appended to patch features, and with 4x its weight.

    python scripts/train_ablations.py [--output runs/ablations] [--steps 3000] [--only NAME ...]
    python scripts/benchmark_lab.py --models chest-ct-vqvae-fs runs/ablations/*
"""

import argparse
import json
import shutil
from pathlib import Path

from medanomaly.bundle import CARD_NAME, resolve_model
from medanomaly.training import recalibrate
from train_default_models import CHEST_INPUT, RECIPES, train_recipe

ROOT = Path(__file__).resolve().parents[1]


def copy_with(source: Path, target: Path, name: str, architecture: dict, input_spec: dict | None = None) -> None:
    """A copy of a bundle under another name with some detection-time architecture (or input) settings changed (the
    weights and their checksums stay; recalibrate afterwards)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    card = json.loads((target / CARD_NAME).read_text())
    card["name"] = name
    card["architecture"].update(architecture)
    card["input"].update(input_spec or {})
    (target / CARD_NAME).write_text(json.dumps(card, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", default=str(ROOT / "runs" / "ablations"))
    ap.add_argument("--steps", type=int, default=1500, help="stage-2 steps of each variant (the flagship had 3000)")
    ap.add_argument("--only", default=None, nargs="*")
    ap.add_argument("--fine-model", default=str(ROOT / "runs" / "fine" / "chest-ct-vqvae-fs-256-fine"),
                    help="folder of the chest-ct-vqvae-fs-256-fine bundle")
    ap.add_argument("--knn-models", default=str(ROOT / "runs" / "knn-models"),
                    help="folder holding chest-ct-deep-knn-simsiam (train_default_models.py --output writes it)")
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    flagship = resolve_model("chest-ct-vqvae-fs")
    # every variant is the shipped random-token recipe (stage 2 on the flagship's stage-1 VQ-VAE and decoder 2, a
    # fresh token classifier) with other corruption settings
    base = RECIPES["chest-ct-vqvae-fs-random-tokens"]
    variants = {"vqvae-fs-random-tokens": {"salient": 0.0},
                "vqvae-fs-mixed-tokens": {"salient": 0.5},
                "vqvae-fs-mixed-no-residual-weight": {"salient": 0.5, "residual_weighting": False}}
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        train_recipe(name, base, out / name, models=flagship.path.parent, steps=args.steps,
                     architecture_overrides={**base["architecture_overrides"], **overrides},
                     description=f"variant of chest-ct-vqvae-fs: {overrides}")
        print(f"trained {name}", flush=True)
    knn_base = RECIPES["chest-ct-deep-knn"]  # the SimSiam stage's weights, memory rebuilt, no gradient steps
    knn_models = Path(args.knn_models)
    for name, overrides in {"deep-knn-adaptor-features": {"patch_features": "adaptor"},
                            "deep-knn-adaptor-no-position": {"patch_features": "adaptor", "position_weight": 0.0},
                            "deep-knn-adaptor-position-2": {"patch_features": "adaptor", "position_weight": 2.0}}.items():
        if args.only and name not in args.only:
            continue
        train_recipe(name, knn_base, out / name, models=knn_models, architecture_overrides=overrides,
                     input=CHEST_INPUT,  # as measured: ablations of deep kNN 0.1.0, whose memory was at 128^2
                     description=f"variant of chest-ct-deep-knn: {overrides} (same weights, memory rebuilt)")
        print(f"built {name}", flush=True)
    # the same weights scored another way at detection time, recalibrated on the source recipe's data: StyleGAN2 by
    # patch MSE; the flagships' classifier map alone; the 256^2 default's map with the token probability sharpened
    default_256 = "chest-ct-vqvae-fs-256"
    rescored = {"stylegan2-mse": ("chest-ct-stylegan2", {"score": "mse"}),
                "vqvae-fs-classifier-only": ("chest-ct-vqvae-fs", {"use_residual": False}),
                "vqvae-fs-256-classifier-only": (default_256, {"use_residual": False}),
                **{f"vqvae-fs-256-probability-power-{power}": (default_256, {"probability_power": float(power)})
                   for power in (2, 4)},
                **{f"vqvae-fs-256-line-{mm}": (default_256, {}, {"line_mm": float(mm)}) for mm in (3, 5)},
                **{f"{name[len('chest-ct-'):]}-grid-offsets-2": (name, {"grid_offsets": 2})
                   for name in (default_256, "chest-ct-vqvae-fs-256-context")},
                "vqvae-fs-256-fine-window-24": (args.fine_model, {"detection_window": 24})}
    for name, (source, architecture, *input_spec) in rescored.items():
        if args.only and name not in args.only:
            continue
        bundle = resolve_model(source)  # a catalog name or a bundle folder
        copy_with(bundle.path, out / name, name, architecture, *input_spec)
        recalibrate(out / name, data=[str(p) for p in RECIPES[bundle.card["name"]]["data"]])
        print(f"recalibrated {name}")

if __name__ == "__main__":
    main()
