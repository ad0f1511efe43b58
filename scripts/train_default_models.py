"""Train every shipped model bundle from the shared real CTs, with fixed seeds, and list them in models/catalog.json.

    python scripts/train_default_models.py [--only NAME] [--steps N]

The data hashes, seeds and the whole training config are recorded in each model card.
"""

import argparse
import logging
import time
from pathlib import Path

from medanomaly.bundle import ModelBundle, catalog_entry, read_catalog, write_catalog
from medanomaly.training import train

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
MODELS = ROOT / "models"

RECIPES = {
    "chest-ct-vqvae-recon": dict(
        method="vqvae-recon",
        data=[SHARED_CT / "chest_ct_01.nii.gz"],
        steps=4000, batch_size=16, learning_rate=2e-3, seed=0,
        input={"size": 128, "spacing_mm": 3.5, "window_hu": [-1000.0, 500.0], "region": "body",
               "smoothing_mm": 3.0, "body_region": "chest"},
        description="Reconstruction-error baseline: MONAI VQVAE trained on normal chest CT slices "
                    "(chest_ct_01, slab split with held-out slabs for calibration). Score = |x - reconstruction|.",
        default=True,
    ),
    "chest-ct-vqvae-fs": dict(
        method="vqvae-fs",
        data=[SHARED_CT / "chest_ct_01.nii.gz"],
        steps=6000, batch_size=16, learning_rate=1e-3, seed=0,
        input={"size": 128, "spacing_mm": 3.5, "window_hu": [-1000.0, 500.0], "region": "body",
               "smoothing_mm": 3.0, "body_region": "chest"},
        description="Flagship: VQ-VAE feature-space anomaly synthesis with a transformer token classifier and a "
                    "decoder from corrupted features (residual-weighted loss), trained on normal chest CT slices "
                    "(chest_ct_01, slab split with held-out slabs for calibration).",
    ),
    "chest-ct-hu-outlier": dict(
        method="hu-outlier",
        data=[SHARED_CT / "chest_ct_01.nii.gz"],
        steps=0, seed=0,
        input={"size": 128, "spacing_mm": 3.5, "window_hu": [-1024.0, 3071.0], "region": "body",
               "smoothing_mm": 3.0, "body_region": "chest"},
        description="Non-learned baseline: deviation of each pixel's local mean HU from the median/MAD of its tissue "
                    "class (from the wider context) on normal chest slices (chest_ct_01, slab split).",
    ),
}


# Bundles derived from a trained one without retraining: same weights, other card settings, recalibrated on the
# same held-out slabs (for example scoring only inside the lungs).
DERIVED = {
    "chest-ct-vqvae-fs-lung": ("chest-ct-vqvae-fs", {"input": {"region": "lung"}},
                               "The flagship scoring inside the lungs only (lung mask from HU and connectivity)."),
    "chest-ct-vqvae-recon-lung": ("chest-ct-vqvae-recon", {"input": {"region": "lung"}},
                                  "The reconstruction baseline scoring inside the lungs only."),
}


def derive(name: str, out: Path) -> None:
    import json
    import shutil

    from medanomaly.bundle import CARD_NAME
    from medanomaly.training import recalibrate

    base, overrides, description = DERIVED[name]
    shutil.rmtree(out / name, ignore_errors=True)
    shutil.copytree(out / base, out / name)
    card = json.loads((out / name / CARD_NAME).read_text())
    card["name"], card["description"] = name, description
    for key, value in overrides.items():
        card[key] = {**card[key], **value} if isinstance(value, dict) else value
    card["derived_from"] = base
    (out / name / CARD_NAME).write_text(json.dumps(card, indent=2))
    data = [str(p) for p in RECIPES[base]["data"]]
    recalibrate(out / name, data=data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=None)
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's steps (for a quick check)")
    ap.add_argument("--output", default=str(MODELS))
    ap.add_argument("--derived-only", action="store_true", help="only re-derive the DERIVED bundles")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    entries = {e["name"]: e for e in read_catalog(out)}
    for name, recipe in RECIPES.items():
        if (args.only and name != args.only) or args.derived_only:
            continue
        recipe = dict(recipe)
        default = recipe.pop("default", False)
        method, data = recipe.pop("method"), [str(p) for p in recipe.pop("data")]
        if args.steps:
            recipe["steps"] = args.steps
        t0 = time.perf_counter()
        bundle = train(method, data, out / name, name=name, **recipe)
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s -> {bundle.path}")
        entries[name] = catalog_entry(ModelBundle.load(out / name), name, default=default)
    for name in DERIVED:
        if args.only and name != args.only:
            continue
        derive(name, out)
        print(f"{name}: derived from {DERIVED[name][0]} and recalibrated")
        entries[name] = catalog_entry(ModelBundle.load(out / name), name)
    write_catalog(out, list(entries.values()))


if __name__ == "__main__":
    main()
