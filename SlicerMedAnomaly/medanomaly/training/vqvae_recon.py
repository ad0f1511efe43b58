"""Trainer of the reconstruction-error baseline (MONAI VQVAE on normal slices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..detectors.vqvae_recon import DEFAULT_ARCHITECTURE
from .codebook import restart_dead_codes
from .data import SliceBuffer, augment

INIT_PREFIXES = ("vqvae.",)  # --init-from continues from another reconstruction model


def architecture(overrides: dict) -> dict:
    return {**DEFAULT_ARCHITECTURE, **overrides}


def trainable(detector) -> torch.nn.Module:
    return detector.vqvae


def loss(model, images: torch.Tensor, regions: torch.Tensor, generator: torch.Generator, **_):
    x = augment(images, generator)
    encodings = model.encode(x)
    quantized, quantization_loss = model.quantize(encodings)
    reconstruction = model.decode(quantized)
    mse = F.mse_loss(reconstruction, x)
    restarted = restart_dead_codes(model.quantizer.quantizer, encodings, generator) if model.training else 0
    total = mse + quantization_loss
    return total, {"loss": total.detach(), "mse": mse.detach(), "quantization": quantization_loss.detach(),
                   "restarted_codes": restarted}


@torch.no_grad()
def training_report(detector, buffer: SliceBuffer) -> dict:
    """Codebook usage over the training slices: a collapsed codebook shows as few codes in use."""
    vqvae = detector.vqvae.eval()
    device = next(vqvae.parameters()).device
    n_codes = detector.card["architecture"]["num_embeddings"]
    used = torch.zeros(n_codes, dtype=torch.long)
    for start in range(0, len(buffer), 64):
        codes = vqvae.index_quantize(buffer.images[start:start + 64].to(device))
        used += torch.bincount(codes.flatten().cpu(), minlength=n_codes)
    p = used.double() / used.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"codebook": {"size": int(n_codes), "used": int((used > 0).sum()),
                         "perplexity": round(perplexity, 2)}}


def memory_per_slice_mb() -> float:
    return 12.0
