"""Train every shipped model bundle from the shared real CTs, with fixed seeds, and list them in models/catalog.json.

    python scripts/train_default_models.py [--only NAME] [--steps N]

The data hashes, seeds and the whole training config are recorded in each model card.

A recipe marked `gpu` is too slow for a CPU (hours on 2 cores) and is left out unless named with --only. Its
gradient steps can run on a GPU node that has neither the CT files nor an image reader:

    python scripts/train_default_models.py --only NAME --prepare-slices slices.safetensors   # where the CTs are
    python scripts/train_default_models.py --only NAME --slices slices.safetensors --steps-only --output DIR  # GPU
    # copy DIR/NAME.checkpoint next to the bundle's place, then, where the CTs are:
    python scripts/train_default_models.py --only NAME --resume     # calibrates on the held-out slabs, writes it
"""

import argparse
import logging
import time
from pathlib import Path

from medanomaly.bundle import ModelBundle, catalog_entry, read_catalog, write_catalog
from medanomaly.preprocess import InputSpec
from medanomaly.training import train
from medanomaly.training.data import SliceBuffer

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
MODELS = ROOT / "models"

CHEST_DATA = [SHARED_CT / "chest_ct_01.nii.gz"]
CHEST_INPUT = {"size": 128, "spacing_mm": 3.5, "window_hu": [-1000.0, 500.0], "region": "body", "smoothing_mm": 3.0,
               "body_region": "chest", "slice_mm": 2.0}
CHEST_INPUT_256 = dict(CHEST_INPUT, size=256, spacing_mm=1.75)  # the same 448 mm field of view, twice as fine
# what the 256^2 flagship's stage-2 continuations share (each adds its steps, learning rate, seed, starting bundle)
STAGE2_256_CONTINUATION = dict(
    method="vqvae-fs", data=CHEST_DATA, batch_size=16, input=CHEST_INPUT_256, checkpoint_every=1000,
    init_prefixes=("vqvae.", "decoder_corrupted.", "classifier."), architecture_overrides={"stage1_fraction": 0.0},
)
# the 256^2 flagship's recipe for 2 CPU cores (random 16x16-token crops in both stages), shared by its variants
CPU_256 = dict(
    method="vqvae-fs", data=CHEST_DATA, steps=10000, batch_size=16, learning_rate=1e-3, seed=0,
    architecture={"salient": 0.0, "stage1_fraction": 0.4, "train_window": 16}, checkpoint_every=1000,
)

RECIPES = {
    "chest-ct-vqvae-recon": dict(
        method="vqvae-recon",
        data=CHEST_DATA,
        steps=4000, batch_size=16, learning_rate=2e-3, seed=0,
        input=CHEST_INPUT,
        description="Reconstruction-error baseline: MONAI VQVAE trained on normal chest CT slices "
                    "(chest_ct_01, slab split with held-out slabs for calibration). Score = |x - reconstruction|.",
    ),
    "chest-ct-vqvae-fs": dict(
        method="vqvae-fs",
        data=CHEST_DATA,
        steps=6000, batch_size=16, learning_rate=1e-3, seed=0,
        input=CHEST_INPUT,
        description="Flagship: VQ-VAE feature-space anomaly synthesis with a transformer token classifier and a "
                    "decoder from corrupted features (residual-weighted loss), trained on normal chest CT slices "
                    "(chest_ct_01, slab split with held-out slabs for calibration).",
    ),
    # the 128^2 model (the default until the 256^2 one below; it trains on 2 CPU cores in 42 min), in two steps:
    # stage 2 retrained from the flagship's stage-1 VQ-VAE and decoder 2 with random
    # instead of salient token corruption, which the lab measured best (salient corruption teaches the classifier
    # where edges are) ...
    "chest-ct-vqvae-fs-random-tokens-stage2a": dict(
        method="vqvae-fs",
        data=CHEST_DATA,
        steps=1500, batch_size=16, learning_rate=1e-3, seed=0,
        input=CHEST_INPUT,
        init_from="chest-ct-vqvae-fs", init_prefixes=("vqvae.", "decoder_corrupted."),
        architecture_overrides={"salient": 0.0, "stage1_fraction": 0.0},
        description="VQ-VAE feature-space anomaly synthesis with a transformer token classifier; corrupted tokens "
                    "drawn at random (not by saliency); stage 2 trained on the flagship's stage-1 VQ-VAE "
                    "(chest_ct_01, slab split with held-out slabs for calibration).",
        intermediate=True,
    ),
    # ... then 3000 more stage-2 steps at half the learning rate (version 0.2.0: the lab measured voxel AP 0.038 ->
    # 0.055 and lesion sensitivity at 0.5 false positives per slab 0.09 -> 0.21 from the longer stage 2)
    "chest-ct-vqvae-fs-random-tokens": dict(
        method="vqvae-fs",
        data=CHEST_DATA,
        steps=3000, batch_size=16, learning_rate=5e-4, seed=1, version="0.2.0",
        input=CHEST_INPUT,
        init_from="chest-ct-vqvae-fs-random-tokens-stage2a",
        init_prefixes=("vqvae.", "decoder_corrupted.", "classifier."),
        architecture_overrides={},
        description="VQ-VAE feature-space anomaly synthesis with a transformer token classifier; corrupted tokens "
                    "drawn at random (not by saliency); stage 2 trained on the flagship's stage-1 VQ-VAE for 1500 "
                    "steps, then 3000 more at half the learning rate (chest_ct_01, slab split with held-out slabs "
                    "for calibration).",
    ),
    # deep kNN in two steps: SimSiam training of backbone, adaptor and predictor (an intermediate bundle, not listed),
    # then the shipped memory of the backbone's patch features (the lab measured them better than the adaptor's)
    "chest-ct-deep-knn-simsiam": dict(
        method="deep-knn",
        data=CHEST_DATA,
        steps=1500, batch_size=32, learning_rate=1e-3, seed=0,
        input=CHEST_INPUT,
        description="Deep kNN, SimSiam stage: ResNet backbone, adaptor and predictor trained self-supervised on "
                    "normal chest CT slices (chest_ct_01, slab split); memory of adaptor patch features.",
        intermediate=True,
    ),
    # version 0.2.0: the memory at 256^2 (1.75 mm; patches of 7 mm instead of 14) from the same SimSiam weights, which
    # were trained at 128^2 (the lab measured voxel AP 0.0077 -> 0.112; 0.1.0 was this recipe with CHEST_INPUT).
    # version 0.3.0: the same memory with density normalization (leave-out scales, +-5 slices): lesion sensitivity at
    # 2 false positives per slab 0.03 -> 0.21 and slab AUROC 0.48 -> 0.57, voxel AP 0.112 -> 0.079 (docs/RESULTS.md)
    "chest-ct-deep-knn": dict(
        method="deep-knn",
        data=CHEST_DATA,
        steps=0, batch_size=32, learning_rate=1e-3, seed=0, version="0.3.0",
        input=CHEST_INPUT_256,
        init_from="chest-ct-deep-knn-simsiam", init_prefixes=("backbone.", "adaptor.", "predictor."),
        architecture_overrides={"patch_features": "backbone", "density_normalization": True,
                                "density_exclusion_slices": 5},
        description="Deep kNN: a ResNet backbone trained self-supervised (SimSiam) on normal chest CT slices at "
                    "128^2, a coreset memory of its normal patch features at 256^2 (1.75 mm pixels, 7 mm patches; "
                    "with in-plane position) and of slice features; "
                    "score = distance to the k nearest normal features divided by the leave-out scale of those "
                    "features (density normalization, +-5 slices), geometric mean over test-time shifts "
                    "(chest_ct_01, slab split with held-out slabs for calibration).",
    ),
    # StyleGAN2 at the model grid's 128^2 with narrow layers (CPU budget); the generator first, then the encoder on
    # it (the shipped bundle). GPU recipe for full resolution: see README "StyleGAN2 on a GPU".
    "chest-ct-stylegan2-generator": dict(
        method="stylegan2",
        data=CHEST_DATA,
        steps=2000, batch_size=16, learning_rate=2e-3, seed=0,
        input=CHEST_INPUT,
        architecture={"channel_base": 1024, "channel_max": 64, "d_channel_max": 64, "encoder_channel_max": 64},
        description="StyleGAN2 generator and discriminator trained on normal chest CT slices (chest_ct_01, slab "
                    "split); inversion starts from the mean latent. The shipped model is chest-ct-stylegan2.",
        intermediate=True,
    ),
    "chest-ct-stylegan2": dict(
        method="stylegan2-encoder",
        data=CHEST_DATA,
        steps=800, batch_size=16, learning_rate=1e-3, seed=0,
        input=CHEST_INPUT,
        init_from="chest-ct-stylegan2-generator", init_prefixes=("generator.",), architecture_overrides={},
        description="StyleGAN2 reconstruction: W+ starts at the encoder's estimate and is refined by Adam on MSE + "
                    "SSIM; score = per-patch 1-D Wasserstein distance between slice and reconstruction; "
                    "pseudo-healthy reconstruction; trained on normal chest CT slices (chest_ct_01, slab split with "
                    "held-out slabs for calibration).",
    ),
    # the flagship at 256^2 (1.75 mm pixels, 32x32 tokens of 14 mm instead of 16x16 of 28 mm), for small lesions, on a
    # GPU: stage 1, then stage 2 with random tokens as in the default ...
    "chest-ct-vqvae-fs-256-base": dict(
        method="vqvae-fs",
        data=CHEST_DATA,
        steps=12000, batch_size=16, learning_rate=1e-3, seed=0,
        input=CHEST_INPUT_256,
        architecture={"salient": 0.0, "stage1_fraction": 0.5},
        checkpoint_every=1000,
        description="VQ-VAE feature-space anomaly synthesis at 256^2 (1.75 mm pixels, 32x32 tokens): stage 1 VQ-VAE "
                    "for 6000 steps, then stage 2 (random token corruption, transformer token classifier, decoder "
                    "from corrupted features) for 6000 (chest_ct_01, slab split with held-out slabs for "
                    "calibration).",
        intermediate=True, gpu=True,
    ),
    # ... then more stage-2 steps at half the learning rate (version 0.1.0 of the default) ...
    "chest-ct-vqvae-fs-256-stage2": dict(
        STAGE2_256_CONTINUATION,
        steps=6000, learning_rate=5e-4, seed=1,
        init_from="chest-ct-vqvae-fs-256-base",
        description="VQ-VAE feature-space anomaly synthesis at 256^2 (1.75 mm pixels, 32x32 tokens of 14 mm), "
                    "trained on a GPU: stage 1 VQ-VAE for 6000 steps, stage 2 (random token corruption, transformer "
                    "token classifier, decoder from corrupted features) for 6000, then 6000 more stage-2 steps at "
                    "half the learning rate (chest_ct_01, slab split with held-out slabs for calibration).",
        intermediate=True, gpu=True,
    ),
    # ... and 4000 more at a quarter of it (version 0.2.0; scripts/train_regularization_256.py's `control`: the lab
    # measured voxel AP 0.061 -> 0.072 and lesion sensitivity at 0.5 false positives per slab 0.12 -> 0.26; stronger
    # augmentation or dropout in this step made it worse)
    "chest-ct-vqvae-fs-256": dict(
        STAGE2_256_CONTINUATION,
        steps=4000, learning_rate=2.5e-4, seed=2, version="0.2.0",
        init_from="chest-ct-vqvae-fs-256-stage2",
        description="VQ-VAE feature-space anomaly synthesis at 256^2 (1.75 mm pixels, 32x32 tokens of 14 mm), "
                    "trained on a GPU: stage 1 VQ-VAE for 6000 steps, stage 2 (random token corruption, transformer "
                    "token classifier, decoder from corrupted features) for 6000, then 6000 more stage-2 steps at "
                    "half the learning rate and 4000 more at a quarter of it (chest_ct_01, slab split with held-out "
                    "slabs for calibration).",
        gpu=True, default=True,
    ),
    # the same 256^2 flagship trained from nothing on 2 CPU cores in one run (47 min): training sees random
    # 16x16-token crops (224 mm), each with its positional embeddings, so a stage-2 step costs about a fifth of a
    # whole-grid step; detection sees the whole grid (scripts/benchmark_training.py; README, "Training the 256^2
    # flagship on a CPU")
    "chest-ct-vqvae-fs-256-cpu": dict(
        CPU_256,
        input=CHEST_INPUT_256,
        description="VQ-VAE feature-space anomaly synthesis at 256^2 (1.75 mm pixels, 32x32 tokens of 14 mm) trained "
                    "on 2 CPU cores: stage 1 VQ-VAE for 4000 steps and stage 2 (random token corruption, transformer "
                    "token classifier, decoder from corrupted features, residual-weighted loss) for 6000, both on "
                    "random 16x16-token crops (224 mm, the classifier with each crop's positional embeddings); "
                    "detection on the whole grid (chest_ct_01, slab split with held-out slabs for calibration).",
    ),
    # the same CPU recipe with 2.5D input: each slice with 2 neighbours on each side (+-4 mm at 2 mm slices) as five
    # channels, which both decoders rebuild; a nodule of 6-8 mm ends within them, a vessel seen end-on does not
    "chest-ct-vqvae-fs-256-context": dict(
        CPU_256,
        input=dict(CHEST_INPUT_256, context_slices=2),
        description="VQ-VAE feature-space anomaly synthesis at 256^2 (1.75 mm pixels, 32x32 tokens of 14 mm) with "
                    "2.5D input: each slice and 2 neighbours on each side (+-4 mm) as five channels, rebuilt by "
                    "both decoders; the map is the middle slice's. Trained on 2 CPU cores as "
                    "chest-ct-vqvae-fs-256-cpu: stage 1 VQ-VAE for 4000 steps and stage 2 (random token corruption, "
                    "transformer token classifier, decoder from corrupted features, residual-weighted loss) for "
                    "6000, both on random 16x16-token crops; detection on the whole grid (chest_ct_01, slab split "
                    "with held-out slabs for calibration).",
    ),
    # an experiment, not shipped (trained only with --only): the CPU recipe with tokens of 7 mm instead of 14, two
    # stride-2 levels (64x64 tokens at 256^2), so that a nodule of 6-8 mm fills a token instead of a sixth of one;
    # training on random 24x24-token crops (168 mm). The lab measured it worse on every count (docs/RESULTS.md,
    # "Tokens of 7 mm"); 114 min on 2 CPU cores
    "chest-ct-vqvae-fs-256-fine": dict(
        CPU_256,
        experiment=True,
        input=CHEST_INPUT_256,
        architecture={**CPU_256["architecture"], "channels": [32, 64], "train_window": 24},
        description="VQ-VAE feature-space anomaly synthesis at 256^2 (1.75 mm pixels) with 64x64 tokens of 7 mm "
                    "(two stride-2 levels), trained on 2 CPU cores: stage 1 VQ-VAE for 4000 steps and stage 2 "
                    "(random token corruption, transformer token classifier, decoder from corrupted features, "
                    "residual-weighted loss) for 6000, both on random 24x24-token crops (168 mm); detection on the "
                    "whole grid (chest_ct_01, slab split with held-out slabs for calibration).",
    ),
    # no network: the Hessian's blobness across a slice and 3 neighbours on each side (+-6 mm), scaled per tissue
    # class by its 99.9th percentile in normal tissue, scored in the lungs (elsewhere round structures are normal
    # anatomy); the held-out slabs calibrate, as for every recipe
    "chest-ct-shape-outlier": dict(
        method="shape-outlier",
        data=CHEST_DATA,
        steps=0, seed=0,
        # version 0.2.0: scored in the lungs closed with a 15 mm rolling ball (region "lung_pleura"), so that nodules
        # on the pleura, which the -400 HU lung threshold leaves out, count too (docs/RESULTS.md)
        input=dict(CHEST_INPUT_256, context_slices=3, smoothing_mm=1.0, region="lung_pleura"), version="0.2.0",
        description="3D shape outlier in the lungs (no network): at every pixel the scale-normalized blobness of "
                    "the Hessian of the smoothed HU volume (sigma 2, 3 and 4 mm; from the slice and 3 neighbours "
                    "on each side), spread over the blob's disc and divided by its 99.9th percentile in normal "
                    "tissue of the same class (a wide local mean of HU), on normal chest slices (chest_ct_01, slab "
                    "split with held-out slabs for calibration). Finds round lesions such as lung nodules, which "
                    "the slice-wise networks confuse with vessels seen end-on, and nodules on the pleura (the "
                    "lungs are closed with a 15 mm rolling ball); not thin or diffuse ones.",
    ),
    # an experiment: the middle eigenvalue at the shape outlier's scales in its region (a nodule on the pleura is a
    # bump on a wall, curved in two directions, where the largest eigenvalue stays near zero)
    "chest-ct-shape-outlier-pleura-tube": dict(
        method="shape-outlier",
        data=CHEST_DATA,
        steps=0, seed=0,
        input=dict(CHEST_INPUT_256, context_slices=3, smoothing_mm=1.0, region="lung_pleura"),
        architecture={"shape": "tube"},
        experiment=True,
        description="experiment: the middle eigenvalue at sigma 2, 3 and 4 mm in the lungs and on the pleura.",
    ),
    # the same statistics for bright tubes (the Hessian's middle eigenvalue) at 1-2 mm over the whole body, in a
    # window that keeps metal (-1024..3071 HU): a needle or wire is far denser than any normal tube of its tissue class
    "chest-ct-tube-outlier": dict(
        method="shape-outlier",
        data=CHEST_DATA,
        steps=0, seed=0,
        input=dict(CHEST_INPUT_256, context_slices=3, smoothing_mm=1.0, window_hu=[-1024.0, 3071.0]),
        architecture={"shape": "tube", "sigmas_mm": [1.0, 1.5, 2.0]},
        description="3D tube outlier in the body (no network): at every pixel the scale-normalized middle eigenvalue "
                    "of the Hessian of the smoothed HU volume (sigma 1, 1.5 and 2 mm; from the slice and 3 neighbours "
                    "on each side; HU window -1024..3071, so metal is not clipped), spread over the tube's width and "
                    "divided by its 99.9th percentile in normal tissue of the same class (a wide local mean of HU), "
                    "on normal chest slices (chest_ct_01, slab split with held-out slabs for calibration). Finds thin "
                    "dense lines such as needles and wires, denser than any normal vessel or bone edge of their "
                    "surroundings; contrast-filled vessels would look alike.",
    ),
    "chest-ct-hu-outlier": dict(
        method="hu-outlier",
        data=CHEST_DATA,
        steps=0, seed=0,
        input={**CHEST_INPUT, "window_hu": [-1024.0, 3071.0]},  # linear HU, nothing clipped
        description="Non-learned baseline: deviation of each pixel's local mean HU from the median/MAD of its tissue "
                    "class (from the wider context) on normal chest slices (chest_ct_01, slab split).",
    ),
}


def train_recipe(name: str, recipe: dict, output: Path, models: Path = MODELS, **overrides) -> ModelBundle:
    """Train one recipe; `init_from` names a bundle in `models` whose weights start a second stage, and
    `architecture_overrides` change that bundle's architecture."""
    recipe = {k: v for k, v in {**recipe, **overrides}.items()
              if k not in ("default", "intermediate", "gpu", "experiment")}
    method, data = recipe.pop("method"), [str(p) for p in recipe.pop("data")]
    if "init_from" in recipe:
        base = models / recipe.pop("init_from")
        recipe["architecture"] = {**ModelBundle.load(base).card["architecture"],
                                  **recipe.pop("architecture_overrides", {})}
        recipe["init_from"] = base
    return train(method, data, output, name=name, **recipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=None)
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's steps (for a quick check)")
    ap.add_argument("--seed", type=int, default=None, help="override the recipe's seed (a replicate run)")
    ap.add_argument("--output", default=str(MODELS))
    ap.add_argument("--prepare-slices", metavar="FILE", help="write the --only recipe's training slices and stop")
    ap.add_argument("--slices", metavar="FILE", help="train the --only recipe from prepared slices")
    ap.add_argument("--steps-only", action="store_true", help="stop after the gradient steps (keep the checkpoint)")
    ap.add_argument("--resume", action="store_true", help="continue from the recipe's checkpoint")
    args = ap.parse_args()
    if (args.prepare_slices or args.slices) and not args.only:
        ap.error("--prepare-slices and --slices need --only NAME")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    entries = {e["name"]: e for e in read_catalog(out)}
    for name, recipe in RECIPES.items():
        if (args.only and name != args.only) or (not args.only and (recipe.get("gpu") or recipe.get("experiment"))):
            continue
        spec = InputSpec.from_card(recipe["input"])
        if args.prepare_slices:
            SliceBuffer([str(p) for p in recipe["data"]], spec, split=True, seed=recipe["seed"]).save(args.prepare_slices)
            print(f"{name}: training slices written to {args.prepare_slices}")
            return
        overrides = {"steps": args.steps} if args.steps else {}
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.slices:
            overrides["slices"] = SliceBuffer.load(args.slices, spec, seed=recipe["seed"])
        t0 = time.perf_counter()
        bundle = train_recipe(name, recipe, out / name, models=out, resume=args.resume, finish=not args.steps_only,
                              **overrides)
        if bundle is None:
            print(f"{name}: gradient steps done in {time.perf_counter() - t0:.0f} s; checkpoint in "
                  f"{out / (name + '.checkpoint')}")
            continue
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s -> {bundle.path}")
        # an intermediate stage is what the next recipe starts from, an experiment a measured variant: neither is a
        # model to use
        if not (recipe.get("intermediate") or recipe.get("experiment")):
            entries[name] = catalog_entry(bundle, name, default=recipe.get("default", False))
    if not args.steps_only:
        write_catalog(out, list(entries.values()))


if __name__ == "__main__":
    main()
