"""Encoder-initialised vs mean-latent GAN inversion on held-out normal chest slices: the reconstruction MSE per
step, as a curve (PNG) and numbers (JSON).

    python scripts/benchmark_inversion.py [--model chest-ct-stylegan2] [--slices 16] [--mean-steps 500]

Target (issue 5): from E(x), inversion reaches the MSE that 500 steps from the mean latent reach in <= 50 steps.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medanomaly.detectors import build_detector
from medanomaly.bundle import resolve_model
from medanomaly.orientation import Reorientation
from medanomaly.preprocess import prepare_slices
from medanomaly.volumes import read_volume

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from benchmark_lab import SHARED_CT, chest_heldout_slabs  # noqa: E402


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot(curves["mean_latent"], label=f"from the mean latent ({summary['mean_latent_steps']} steps)")
    ax.plot(curves["encoder"], label=f"from E(x) ({summary['encoder_steps']} steps)")
    ax.axhline(summary["mean_latent_final_mse"], color="gray", ls="--", lw=0.8, label="mean-latent final MSE")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, len(curves["mean_latent"]))
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("reconstruction MSE")
    ax.set_title(f"GAN inversion, {len(summary['slices'])} held-out chest slices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="chest-ct-stylegan2")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--mean-steps", type=int, default=500)
    ap.add_argument("--encoder-steps", type=int, default=50)
    ap.add_argument("--output", default=str(ROOT / "scripts" / "results" / "inversion"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    out = Path(args.output)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        return
    torch.manual_seed(0)
    detector = build_detector(resolve_model(args.model)).eval()
    volume = read_volume(SHARED_CT / "chest_ct_01.nii.gz")
    r = Reorientation.for_image(volume.image)
    slices = prepare_slices(r.to_canonical(volume.hu), r.canonical_spacing, detector.spec)
    held = np.concatenate([np.arange(a, b) for a, b in chest_heldout_slabs(slices.hu.shape[0])])
    chosen = held[np.linspace(0, held.size - 1, args.slices).round().astype(int)]
    x01 = slices.windowed(detector.spec)[chosen, None]
    target = x01 * 2 - 1
    g = detector.generator
    inversion = detector.inversion
    curves, seconds = {}, {}
    with torch.no_grad():
        ws_enc = detector.encode(x01)
        curves["encoder_only"] = [float((g(ws_enc) - target).pow(2).mean())]
    for name, init, steps in (("mean_latent", g.mean_ws(len(chosen)), args.mean_steps),
                              ("encoder", ws_enc, args.encoder_steps)):
        record: list[float] = []
        t0 = time.perf_counter()
        inversion.run(target, init, steps=steps, record=record)
        seconds[name] = time.perf_counter() - t0
        curves[name] = record
        print(f"{name}: {steps} steps, MSE {record[0]:.5f} -> {record[-1]:.5f} ({seconds[name]:.0f} s)")
    goal = curves["mean_latent"][-1]
    reached = next((i for i, v in enumerate(curves["encoder"]) if v <= goal), None)
    summary = {
        "model": args.model, "slices": [int(c) for c in chosen], "source": "chest_ct_01 held-out slabs",
        "mse_units": "pixel MSE on [-1, 1] windowed intensities",
        "mean_latent_final_mse": goal, "mean_latent_steps": args.mean_steps,
        "encoder_only_mse": curves["encoder_only"][0], "encoder_final_mse": curves["encoder"][-1],
        "encoder_steps": args.encoder_steps, "encoder_steps_to_reach_mean_latent_final": reached,
        "target_met": reached is not None and reached <= 50, "seconds": seconds, "curves": curves,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(f"encoder reaches the mean-latent {args.mean_steps}-step MSE after {reached} steps -> {out}.json/.png")


if __name__ == "__main__":
    main()
