"""The flagship's token classifier on the CPU: torch's fused inference fast path against the classifier's own
layer (detectors.vqvae_fs.EncoderLayer, attention by F.scaled_dot_product_attention).

    python scripts/benchmark_classifier.py [--runs 5] [--slices 40] [--model chest-ct-vqvae-fs-256]

Each run is a fresh process that times the classifier over `--slices` slices of the model's token grid, one slice
per call as `detect` calls it on a CPU, on codebook vectors of the bundle (the cost does not depend on which). Three
settings: 2 threads (one `detect`), 1 thread, and two 1-thread processes at once (two batch workers on 2 cores).
Prints medians over the runs, in ms per slice.
"""

import argparse
import statistics

from benchmark_batch_cpu import at_once

CHILD = """
import sys, time, torch
from medanomaly.bundle import resolve_model
from medanomaly.detectors import build_detector
model, mode, threads, slices = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
detector = build_detector(resolve_model(model)).eval()
if mode == "fast path":  # the stock layer with the same weights
    for layer in detector.classifier.blocks.layers:
        layer.__class__ = torch.nn.TransformerEncoderLayer
side = detector.spec.size // detector.stride
generator = torch.Generator().manual_seed(0)
codes = torch.randint(0, detector.codebook.shape[0], (slices, side, side), generator=generator)
tokens = detector.codebook.detach()[codes].permute(0, 3, 1, 2).contiguous()
with torch.inference_mode():
    detector.classifier(tokens[:1])
    t = time.perf_counter()
    for i in range(slices):
        detector.classifier(tokens[i:i + 1])
print(1000 * (time.perf_counter() - t) / slices)
"""

MODES = ("fast path", "scaled_dot_product_attention")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256")
    args = ap.parse_args()
    settings = (("2 threads", 2, 1), ("1 thread", 1, 1), ("two 1-thread processes at once", 1, 2))
    results = {(name, mode): [] for name, _, _ in settings for mode in MODES}
    for _ in range(args.runs):  # the modes alternate within each run, so that both see the same hour
        for name, threads, copies in settings:
            for mode in MODES:
                results[name, mode] += at_once(CHILD, [args.model, mode, str(threads), str(args.slices)], copies)
    print(f"{args.model}: classifier ms per slice, medians of {args.runs} runs ({args.slices} slices each)")
    for name, _, _ in settings:
        fast, ours = (statistics.median(results[name, mode]) for mode in MODES)
        print(f"{name}: fast path {fast:.1f}, scaled_dot_product_attention {ours:.1f} ({fast / ours:.2f}x); runs "
              + "; ".join(f"{mode}: " + ", ".join(f"{v:.1f}" for v in results[name, mode]) for mode in MODES))


if __name__ == "__main__":
    main()
