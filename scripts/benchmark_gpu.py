"""Does the GPU path give the CPU's maps, and how fast is it? Scores prepared model-grid slices with a bundle through
the engine's batch call (`medanomaly.engine.score_batch`): on the CPU in float32 (the reference), on CUDA in float32,
and on CUDA with the float16 autocast that `detect` uses. Reports, against the reference: the share of VQ codes that
change (for VQ-VAE methods), the maps' correlation and largest difference, the overlap of the top 0.1% of pixels,
and slices per second (medians of several timed passes). For the flagship it also runs the token classifier both
ways on each CUDA setting: through its own layer (`detectors.vqvae_fs.EncoderLayer`, attention by
`F.scaled_dot_product_attention`) and through torch's stock `nn.TransformerEncoderLayer` with the same weights (its
fused inference fast path where torch takes it), giving the largest logit difference and ms per batch of each.

    python scripts/train_default_models.py --only chest-ct-vqvae-fs-256-base --prepare-slices slices.safetensors
    python scripts/benchmark_gpu.py --slices slices.safetensors [--model NAME] [--json results.json]

No image reader is needed, so it runs on a GPU node that has only the repository and the prepared slices.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from medanomaly.bundle import resolve_model
from medanomaly.detectors import build_detector
from medanomaly.engine import network_precision, score_batch
from medanomaly.training.data import SliceBuffer


def score_all(detector, images, regions, device, mixed_precision, batch):
    maps, codes = [], []
    detector.to(device)
    for start in range(0, len(images), batch):
        out = score_batch(detector, images[start:start + batch], regions[start:start + batch], device,
                          mixed_precision=mixed_precision)
        maps.append(out.score[:, 0].float().cpu())
        if hasattr(detector, "encode"):
            with torch.inference_mode(), network_precision(device, mixed_precision):
                codes.append(detector.encode(images[start:start + batch, None].to(device))[2].cpu())
    return torch.cat(maps).numpy(), (torch.cat(codes).numpy() if codes else None)


def median_seconds(run, device, passes):
    """Median wall time of `passes` calls of `run`, after one more that warms up (kernels, allocator)."""
    seconds = []
    for _ in range(passes + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[1:])


def timed(detector, images, regions, device, mixed_precision, batch, passes):
    def run():
        for start in range(0, len(images), batch):
            score_batch(detector, images[start:start + batch], regions[start:start + batch], device,
                        mixed_precision=mixed_precision)

    return len(images) / median_seconds(run, device, passes)


def compare(reference, maps, ref_codes, codes):
    top = np.quantile(reference, 0.999)
    a, b = reference >= top, maps >= np.quantile(maps, 0.999)
    return {"pearson_r": float(np.corrcoef(reference.ravel(), maps.ravel())[0, 1]),
            "max_abs_diff_over_p999": float(np.abs(reference - maps).max() / max(top, 1e-12)),
            "top_0.1%_dice": float(2 * (a & b).sum() / max(1, a.sum() + b.sum())),
            "codes_changed": None if ref_codes is None else float((ref_codes != codes).mean())}


def classifier_paths(detector, images, device, mixed_precision, batch, passes):
    """The flagship's classifier on the quantized tokens of the slices, through its own layer and through torch's
    stock layer with the same weights: the largest logit difference and ms per batch (median of `passes`)."""
    with torch.inference_mode(), network_precision(device, mixed_precision):
        tokens = torch.cat([detector.encode(images[s:s + batch, None].to(device))[1]
                            for s in range(0, len(images), batch)])

    def run():
        return torch.cat([detector.classifier(tokens[s:s + batch]).float() for s in range(0, len(tokens), batch)])

    layers = detector.classifier.blocks.layers
    own = layers[0].__class__
    logits, ms = {}, {}
    try:
        for name, cls in (("own_layer", own), ("stock_layer", torch.nn.TransformerEncoderLayer)):
            for layer in layers:
                layer.__class__ = cls
            with torch.inference_mode(), network_precision(device, mixed_precision):
                logits[name] = run()
                ms[name] = 1000 * median_seconds(run, device, passes) * batch / len(tokens)
    finally:
        for layer in layers:
            layer.__class__ = own
    return {"max_abs_logit_diff": float((logits["own_layer"] - logits["stock_layer"]).abs().max()),
            "max_abs_logit": float(logits["stock_layer"].abs().max()),
            **{f"{name}_ms_per_batch": ms[name] for name in ms}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", required=True, help="slices written by train_default_models.py --prepare-slices")
    ap.add_argument("--model", default=None, help="catalog name or bundle folder (default: the default model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--passes", type=int, default=5, help="timed passes per configuration (median)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bundle = resolve_model(args.model)
    detector = build_detector(bundle)
    buffer = SliceBuffer.load(args.slices, detector.spec)
    images, regions = buffer.images[:, 0], buffer.regions[:, 0]
    cpu = torch.device("cpu")
    reference, ref_codes = score_all(detector, images, regions, cpu, False, args.batch)
    results = {"model": bundle.card["name"], "slices": len(images), "size": detector.spec.size,
               "cpu_float32": {"slices_per_s": timed(detector, images, regions, cpu, False, args.batch, 1),
                               "threads": torch.get_num_threads()}}
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        results["gpu"] = torch.cuda.get_device_name(gpu)
        for name, mixed in (("cuda_float32", False), ("cuda_float16_autocast", True)):
            maps, codes = score_all(detector, images, regions, gpu, mixed, args.batch)
            results[name] = {**compare(reference, maps, ref_codes, codes),
                             "slices_per_s": timed(detector, images, regions, gpu, mixed, args.batch, args.passes)}
            if hasattr(detector, "classifier"):
                results[name]["classifier"] = classifier_paths(detector, images, gpu, mixed, args.batch, args.passes)
    else:
        results["gpu"] = None
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
