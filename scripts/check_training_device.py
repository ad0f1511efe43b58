"""Do the gradient steps of every trainer run on this machine's accelerator? A few steps of each method from prepared
slices (no image reader needed), on `--device` (default: auto, CUDA where there is one), each method's first and
last losses printed and required to be finite. For a GPU node, before a long training run there; CPU tests cover
the same code on the CPU.

    python scripts/train_default_models.py --only chest-ct-vqvae-fs-256 --prepare-slices slices.safetensors
    python scripts/check_training_device.py --slices slices.safetensors [--steps 100]
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from medanomaly.preprocess import InputSpec
from medanomaly.training import train
from medanomaly.training.data import SliceBuffer
from train_default_models import CHEST_INPUT_256

# Not here: the StyleGAN2 encoder's trainer, which needs a trained generator at the slices' 256^2 grid (the shipped
# one is 128^2); only the CPU tests run its steps.
METHODS = {
    "vqvae-recon": {},
    "vqvae-fs": {"stage1_fraction": 0.5},  # half the steps in each stage: both stages run
    "deep-knn": {},
    "stylegan2": {"resolution": 256, "channel_base": 1024, "channel_max": 64, "d_channel_max": 64,
                  "encoder_channel_max": 64},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", required=True, help="prepared slices at the 256^2 chest grid")
    ap.add_argument("--steps", type=int, default=100, help="steps per method (losses are logged every 50)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    buffer = SliceBuffer.load(args.slices, InputSpec.from_card(CHEST_INPUT_256))
    failed = []
    for method, arch in METHODS.items():
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                train(method, [], Path(tmp) / method, slices=buffer, finish=False, steps=args.steps, batch_size=8,
                      input=CHEST_INPUT_256, architecture=arch, device=args.device, checkpoint_every=10**9)
                state = json.loads((Path(tmp) / f"{method}.checkpoint" / "checkpoint.json").read_text())
            losses = state["losses"]
            first, last = losses[0], losses[-1]
            finite = all(math.isfinite(v) for entry in losses for k, v in entry.items() if k != "step")
            devices = [d["device"] for d in state.get("devices", [])]
            print(f"{method}: {args.steps} steps on {devices} in {time.perf_counter() - t0:.1f} s; "
                  f"first {first}, last {last}; finite: {finite}", flush=True)
            if not finite:
                failed.append(method)
        except Exception as exc:  # noqa: BLE001 - report every method, then fail
            print(f"{method}: FAILED: {exc.__class__.__name__}: {exc}", flush=True)
            failed.append(method)
    print("all trainers ran" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
