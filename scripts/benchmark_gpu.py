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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(detector, images, regions, device, mixed_precision, batch, passes):
    seconds = []
    for _ in range(passes + 1):  # the first pass warms up (kernels, allocator) and is not counted
        synchronize(device)
        t0 = time.perf_counter()
        for start in range(0, len(images), batch):
            score_batch(detector, images[start:start + batch], regions[start:start + batch], device,
                        mixed_precision=mixed_precision)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return len(images) / statistics.median(seconds[1:])


def compare(reference, maps, ref_codes, codes):
    top = np.quantile(reference, 0.999)
    a, b = reference >= top, maps >= np.quantile(maps, 0.999)
    return {"pearson_r": float(np.corrcoef(reference.ravel(), maps.ravel())[0, 1]),
            "max_abs_diff_over_p999": float(np.abs(reference - maps).max() / max(top, 1e-12)),
            "top_0.1%_dice": float(2 * (a & b).sum() / max(1, a.sum() + b.sum())),
            "codes_changed": None if ref_codes is None else float((ref_codes != codes).mean())}


def classifier_paths(detector, images, regions, device, mixed_precision, batch, passes):
    """The flagship's classifier on the quantized tokens of the slices, through its own layer and through torch's
    stock layer with the same weights: the largest logit difference and ms per batch (median of `passes`)."""
    with torch.inference_mode(), network_precision(device, mixed_precision):
        tokens = torch.cat([detector.encode(images[s:s + batch, None].to(device))[1]
                            for s in range(0, len(images), batch)])
    layers = detector.classifier.blocks.layers
    own = layers[0].__class__
    out = {}
    for name, cls in (("own_layer", own), ("stock_layer", torch.nn.TransformerEncoderLayer)):
        for layer in layers:
            layer.__class__ = cls
        with torch.inference_mode(), network_precision(device, mixed_precision):
            logits = torch.cat([detector.classifier(tokens[s:s + batch]).float() for s in range(0, len(tokens), batch)])
            seconds = []
            for _ in range(passes + 1):
                synchronize(device)
                t0 = time.perf_counter()
                for s in range(0, len(tokens), batch):
                    detector.classifier(tokens[s:s + batch])
                synchronize(device)
                seconds.append(time.perf_counter() - t0)
        out[name] = {"logits": logits, "ms_per_batch": 1000 * statistics.median(seconds[1:]) * batch / len(tokens)}
    for layer in layers:
        layer.__class__ = own
    difference = float((out["own_layer"]["logits"] - out["stock_layer"]["logits"]).abs().max())
    return {"max_abs_logit_diff": difference, "max_abs_logit": float(out["stock_layer"]["logits"].abs().max()),
            **{f"{name}_ms_per_batch": out[name]["ms_per_batch"] for name in out}}


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
                results[name]["classifier"] = classifier_paths(detector, images, regions, gpu, mixed, args.batch,
                                                               args.passes)
    else:
        results["gpu"] = None
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
