"""Seconds per gradient step of the flagship's two stages on this machine, and what they make of a shipped recipe.

It runs the real `medanomaly.training.train` (the recipe's input grid, batch size and architecture) for a few steps
of each stage, timing every step through its progress callback, and projects the whole recipe chain (the recipe and
every bundle it starts from) as stage-1 steps x median stage-1 step + stage-2 steps x median stage-2 step. Loading
the slices and calibration are not counted (a minute or two on the CPU).

    python scripts/benchmark_training.py [--recipe chest-ct-vqvae-fs-256] [--slices FILE] [--steps 20]
                                         [--architecture-json '{"train_window": 16}']

Without --slices the recipe's training volumes are read from ../shared (scripts/train_default_models.py
--prepare-slices writes a slices file).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medanomaly.preprocess import InputSpec
from medanomaly.training import train
from medanomaly.training.data import SliceBuffer
from medanomaly.training.vqvae_fs import STAGE_DEFAULTS
from train_default_models import RECIPES


def chain(name: str) -> list[str]:
    """The recipe and the recipes it starts from, first trained first."""
    names = [name]
    while "init_from" in RECIPES[names[0]]:
        names.insert(0, RECIPES[names[0]]["init_from"])
    return names


def architecture_of(name: str) -> dict:
    """A recipe's architecture settings: those of the bundle it starts from, with its overrides."""
    recipe = RECIPES[name]
    base = architecture_of(recipe["init_from"]) if "init_from" in recipe else {}
    return {**base, **recipe.get("architecture", {}), **recipe.get("architecture_overrides", {})}


def stage_steps(name: str) -> tuple[int, int]:
    """(stage-1 steps, stage-2 steps) of a recipe."""
    recipe = RECIPES[name]
    architecture = architecture_of(name)
    fraction = float(architecture.get("stage1_fraction", STAGE_DEFAULTS["stage1_fraction"]))
    stage1 = int(fraction * recipe["steps"])
    return stage1, recipe["steps"] - stage1


def step_seconds(recipe: dict, steps: int, slices: SliceBuffer | None) -> dict[float, list[float]]:
    """Seconds of each step of a short run with half its steps in each stage, by stage (1.0, 2.0)."""
    times: dict[float, list[float]] = {1.0: [], 2.0: []}
    last = [time.perf_counter()]

    def progress(step, total, parts):
        now = time.perf_counter()
        times[float(parts["stage"])].append(now - last[0])
        last[0] = now

    architecture = {**recipe.get("architecture", {}), "stage1_fraction": 0.5}
    with tempfile.TemporaryDirectory() as tmp:
        last[0] = time.perf_counter()
        train("vqvae-fs", [str(p) for p in recipe["data"]], Path(tmp) / "bundle", name="timing", steps=2 * steps,
              batch_size=recipe["batch_size"], learning_rate=recipe["learning_rate"], seed=recipe["seed"],
              input=recipe["input"], architecture=architecture, checkpoint_every=10**9, slices=slices,
              progress=progress, finish=False)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="chest-ct-vqvae-fs-256")
    ap.add_argument("--slices", default=None, help="prepared training slices of the recipe (skips ../shared)")
    ap.add_argument("--steps", type=int, default=20, help="steps timed in each stage (the first 3 are warm-up)")
    ap.add_argument("--architecture-json", default="{}",
                    help="card settings that replace the recipe's for the timed steps (the step counts stay the "
                         "recipe's), for example '{\"train_window\": 16}'")
    args = ap.parse_args()
    names = chain(args.recipe)
    recipe = RECIPES[args.recipe]
    overrides = json.loads(args.architecture_json)
    recipe = dict(recipe, architecture={**recipe.get("architecture", {}), **overrides})
    if recipe["method"] != "vqvae-fs":
        raise SystemExit(f"{args.recipe} is a {recipe['method']} recipe; this benchmark times the flagship")
    spec = InputSpec.from_card(recipe["input"])
    slices = SliceBuffer.load(args.slices, spec, seed=recipe["seed"]) if args.slices else None
    times = step_seconds(recipe, args.steps, slices)
    median = {stage: statistics.median(t[3:]) for stage, t in times.items()}
    label = f"{args.recipe} with {json.dumps(overrides)}" if overrides else args.recipe
    print(f"{label}: {spec.size}x{spec.size} slices at {spec.spacing_mm} mm, batch {recipe['batch_size']}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores; median of {args.steps - 3} steps: "
          f"stage 1 {median[1.0]:.3f} s/step, stage 2 {median[2.0]:.3f} s/step")
    total = 0.0
    for name in names:
        s1, s2 = stage_steps(name)
        seconds = s1 * median[1.0] + s2 * median[2.0]
        total += seconds
        print(f"  {name}: {s1} stage-1 + {s2} stage-2 steps -> {seconds / 60:.1f} min")
    print(f"whole chain: {total / 60:.1f} min ({total / 3600:.2f} h) of gradient steps on this machine")


if __name__ == "__main__":
    main()
