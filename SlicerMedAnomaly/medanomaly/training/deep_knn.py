"""Trainer of the deep-kNN detector.

1. SimSiam on augmentations of normal slices (stop-gradient, symmetric negative cosine): the backbone, the adaptor
   (projector) and the predictor learn together, from scratch. With `backbone_weights` (a torchvision or timm ResNet
   file: safetensors, or a torch file read with weights_only=True) the backbone is loaded and frozen and only the
   adaptor and predictor learn.
2. The memory: features of every training slice (at every test-time shift), patches that touch the body, reduced by
   a greedy coreset to at most `memory_max_patches` rows; and one pooled feature per slice and shift.
3. With density normalization, the leave-out scale of every memory row (neighbours.leave_out_scales): how far the
   training features nearest to it lie from the memory once their own slice and `density_exclusion_slices` slices
   on either side of it are left out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..detectors.deep_knn import DEFAULT_ARCHITECTURE
from ..errors import InputError
from ..neighbours import greedy_coreset, leave_out_scales
from .data import SliceBuffer, augment

INIT_PREFIXES = ("backbone.", "adaptor.", "predictor.")  # --init-from: the networks; the memory is rebuilt

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "memory_max_patches": 16384,  # coreset size of the patch memory
    "backbone_weights": None,  # a user's ResNet weight file (frozen backbone), or None: self-supervised from scratch
    "density_normalization": True,  # new models divide distances by leave-out scales (bundles before 0.3.0: off)
}


def architecture(overrides: dict) -> dict:
    arch = {**DEFAULT_ARCHITECTURE, **TRAINER_DEFAULTS, **overrides}
    if arch["backbone_weights"]:
        arch["backbone_source"] = Path(arch["backbone_weights"]).name
    return arch


def read_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision/timm ResNet state dict from safetensors, or from a torch file with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"backbone_weights {path}: no such file; give a ResNet weight file (.safetensors or .pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise InputError(f"backbone_weights {path}: not a weights-only torch file ({exc.__class__.__name__}); "
                             "save it with torch.save(model.state_dict()) or as safetensors") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InputError(f"backbone_weights {path}: holds no state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_backbone(backbone: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Load torchvision-named ResNet weights into the MONAI ResNet; an RGB first convolution is summed to one
    channel. Returns the number of tensors loaded; refuses a file that does not fit the architecture."""
    own = backbone.state_dict()
    chosen = {}
    for name, value in state.items():
        if name not in own:
            continue
        if name == "conv1.weight" and value.shape[1] == 3 and own[name].shape[1] == 1:
            value = value.sum(1, keepdim=True)
        if value.shape != own[name].shape:
            raise InputError(f"backbone weights: {name} has shape {tuple(value.shape)}, the architecture needs "
                             f"{tuple(own[name].shape)}; set layers/block_inplanes to the file's ResNet")
        chosen[name] = value
    missing = [k for k in own if k not in chosen and not k.endswith("num_batches_tracked")]
    if missing:
        raise InputError(f"backbone weights miss {len(missing)} tensors (first: {missing[0]}); "
                         "give a torchvision/timm ResNet state dict")
    backbone.load_state_dict(chosen, strict=False)
    return len(chosen)


def trainable(detector) -> torch.nn.Module:
    weights = detector.arch.get("backbone_weights")
    if weights:
        n = load_backbone(detector.backbone, read_backbone_weights(weights))
        detector.backbone.requires_grad_(False)
        log.info("backbone: %d tensors from %s, frozen", n, weights)
    return detector


def _views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view: geometric augmentation, then contrast, brightness and noise."""
    x = augment(images, generator, max_rotation_deg=10.0, scale_range=0.12, max_shift=0.08)
    b = x.shape[0]
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * 0.15
    brightness = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * 0.05
    noise = torch.randn(x.shape, generator=generator) * 0.01
    # drawn on the CPU generator (the same views on every device), applied where the images are
    return (x * contrast.to(x.device) + brightness.to(x.device) + noise.to(x.device)).clamp(0, 1)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity with stop-gradient on the targets (Chen and He, 2021): in [-1, 1]."""
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=1).mean() + F.cosine_similarity(p2, z1.detach(), dim=1).mean())


def loss(detector, images: torch.Tensor, regions: torch.Tensor, generator: torch.Generator, **_):
    if detector.arch.get("backbone_weights"):
        detector.backbone.eval()  # frozen: its batch statistics stay those of the file
    v1, v2 = _views(images, generator), _views(images, generator)
    _, z1 = detector.embed(v1.to(images.device))
    _, z2 = detector.embed(v2.to(images.device))
    p1, p2 = detector.predictor(z1), detector.predictor(z2)
    total = simsiam_loss(p1, p2, z1, z2)
    with torch.no_grad():  # collapse shows as a vanishing spread of the normalised projections
        spread = F.normalize(z1, dim=1).std(0).mean() * z1.shape[1] ** 0.5
    return total, {"loss": total.detach(), "projection_spread": spread}


@torch.no_grad()
def finalize(detector, buffer: SliceBuffer, config) -> dict:
    """Build the memories from the training slices; returns the memory sizes for the card and a report."""
    detector.eval()
    device = next(detector.parameters()).device
    arch = detector.arch
    patches, images, patch_origins, image_origins = [], [], [], []
    for shift in arch["tta_shifts"]:
        shift = (int(shift[0]), int(shift[1]))
        for start in range(0, len(buffer), 32):
            x = buffer.images[start:start + 32].to(device)
            region = buffer.regions[start:start + 32].to(device)
            origins = buffer.origins[start:start + 32]
            feats, pooled = detector.features(x, shift)
            keep = detector.patch_region(region, shift)
            patches.append(feats[keep].cpu())
            patch_origins.append(origins[keep.nonzero()[:, 0].cpu()])
            images.append(pooled.cpu())
            image_origins.append(origins)
    patches, patch_origins = torch.cat(patches), torch.cat(patch_origins)
    images, image_origins = torch.cat(images), torch.cat(image_origins)
    chosen, radius = greedy_coreset(patches, int(arch["memory_max_patches"]), seed=config.seed)
    detector.memory_patches = patches[chosen].contiguous()
    detector.memory_images = images.contiguous()
    report = {}
    if arch["density_normalization"]:
        window = int(arch["density_exclusion_slices"])
        detector.memory_patch_scales = leave_out_scales(patches, patch_origins, chosen, int(arch["k"]), window)
        detector.memory_image_scales = leave_out_scales(images, image_origins, torch.arange(len(images)),
                                                        int(arch["k_image"]), window)
        report["density_scales"] = {
            kind: {"median": round(float(v.median()), 5), "p05": round(float(v.quantile(0.05)), 5),
                   "p95": round(float(v.quantile(0.95)), 5)}
            for kind, v in (("patch", detector.memory_patch_scales), ("image", detector.memory_image_scales))}
        log.info("leave-out scales (+-%d slices): patches median %.4f, slices median %.4f", window,
                 float(detector.memory_patch_scales.median()), float(detector.memory_image_scales.median()))
    sizes = {"memory_patches": int(detector.memory_patches.shape[0]), "memory_images": int(images.shape[0])}
    detector.arch.update(sizes)
    mb = (detector.memory_patches.numel() + detector.memory_images.numel()) * 4 / 2**20
    log.info("memory: %d of %d patches (coreset radius %.4f), %d slices, %.1f MB", sizes["memory_patches"],
             patches.shape[0], radius, sizes["memory_images"], mb)
    return {"architecture": sizes,
            "memory": {"patch_candidates": int(patches.shape[0]), **sizes, "coreset_radius": round(radius, 5),
                       "megabytes": round(mb, 2), **report}}


def training_report(detector, buffer: SliceBuffer) -> dict:
    return {}


def memory_per_slice_mb() -> float:
    return 24.0
