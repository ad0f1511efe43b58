"""Trainer of the flagship: stage 1 VQ-VAE on normal slices, stage 2 feature synthesis, token classifier and the
decoder from corrupted features with the residual-weighted loss (encoder and codebook frozen)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..detectors.vqvae_fs import DEFAULT_ARCHITECTURE, residual_weight, synthesize
from .codebook import restart_dead_codes
from .data import SliceBuffer, augment
from .vqvae_recon import training_report as codebook_report

INIT_PREFIXES = ("vqvae.",)  # --init-from reuses a trained stage 1 (encoder, codebook, decoder)

UNUSED_PARAMETERS = True  # stage 1 leaves classifier and decoder 2 out of the graph (DDP must know)
STAGE_DEFAULTS = {
    "stage1_fraction": 0.5,  # share of the steps spent on the VQ-VAE
    "corrupt_fraction": 0.1,  # p: share of tokens corrupted
    "neighbours": 20,  # k nearest codebook entries per salient token
    "salient": 1.0,  # chance that a batch corrupts the most salient tokens rather than random ones (0: ablation)
    "residual_weighting": True,  # False: plain CE on corrupted tokens (ablation)
    "blob_probability": 0.5,  # chance that a slice's corruption is grown into contiguous blobs
    # random rotation (degrees), scaling and shift (share of the field) of each training slice: the classifier's
    # learned positional embeddings meet the anatomy of unseen scans at other positions
    "augment_rotation_deg": 7.0,
    "augment_scale": 0.08,
    "augment_shift": 0.05,
}


def architecture(overrides: dict) -> dict:
    return {**DEFAULT_ARCHITECTURE, **STAGE_DEFAULTS, **overrides}


def trainable(detector) -> torch.nn.Module:
    return detector


def loss(detector, images: torch.Tensor, regions: torch.Tensor, generator: torch.Generator, *, step: int, config):
    arch = detector.arch
    x = augment(images, generator, max_rotation_deg=float(arch["augment_rotation_deg"]),
                scale_range=float(arch["augment_scale"]), max_shift=float(arch["augment_shift"]))
    vqvae = detector.vqvae
    window = int(arch["train_window"])
    side = x.shape[-1] // detector.stride  # token grid of a whole slice
    if not 0 < window < side:
        window = 0
    if step < int(arch["stage1_fraction"] * config.steps):
        if window:  # the VQ-VAE is convolutional: it learns as well from the training window's pixels
            x = crop_tokens(x, random_offset(side, window, generator), window, detector.stride)
        encodings = vqvae.encode(x)
        quantized, commitment = vqvae.quantize(encodings)
        reconstruction = vqvae.decode(quantized)
        mse = F.mse_loss(reconstruction, x)
        restarted = restart_dead_codes(vqvae.quantizer.quantizer, encodings, generator)
        total = 2 * mse + commitment
        return total, {"loss": total.detach(), "stage": 1.0, "mse": mse.detach(), "restarted_codes": restarted}
    # stage 2: encoder and codebook frozen (no gradients, no EMA updates)
    vqvae.encoder.eval()
    vqvae.quantizer.eval()
    offsets = None
    with torch.no_grad():
        if window:  # one window per batch: encode it with a margin of tokens around it, as inside a whole slice
            offset = random_offset(side, window, generator)
            start = [max(0, o - CROP_MARGIN_TOKENS) for o in offset]
            encoded = crop_tokens(x, start, window + 2 * CROP_MARGIN_TOKENS, detector.stride)
            encodings, quantized, codes = detector.encode(encoded)
            inside = [o - s for o, s in zip(offset, start)]
            encodings, quantized, codes = (crop_tokens(t, inside, window, 1) for t in (encodings, quantized, codes))
            x = crop_tokens(x, offset, window, detector.stride)
            offsets = torch.tensor([offset] * x.shape[0])
        else:
            encodings, quantized, codes = detector.encode(x)
        blob = bool(torch.rand(1, generator=generator) < arch["blob_probability"])
        salient = bool(torch.rand(1, generator=generator) < float(arch["salient"]))
        corrupted, mask = synthesize(encodings, quantized, codes, detector.codebook, generator,
                                     fraction=arch["corrupt_fraction"], k=arch["neighbours"], salient=salient,
                                     blob=blob)
    reconstruction = vqvae.decode(quantized)  # decoder 1 keeps learning normal reconstruction
    repaired = detector.decoder_corrupted(corrupted)
    logits = detector.classifier(corrupted, offsets)
    ce = F.cross_entropy(logits, mask.long(), reduction="none")  # [B, h, w]
    normal_ce = (ce * ~mask).sum() / (~mask).sum().clamp(min=1)
    if arch["residual_weighting"]:  # the residual of the scored (middle) slice, as at detection
        middle = slice(detector.middle, detector.middle + 1)
        weight = residual_weight((repaired.detach()[:, middle] - x[:, middle]).abs(), detector.stride)
    else:
        weight = torch.ones_like(ce)
    corrupted_ce = (ce * weight * mask).sum() / mask.sum().clamp(min=1)
    mse = F.mse_loss(reconstruction, x)
    mse_repaired = F.mse_loss(repaired, x)
    total = 2 * mse + normal_ce + corrupted_ce + 2 * mse_repaired
    with torch.no_grad():
        predicted = logits.argmax(1).bool()
        recall = (predicted & mask).sum() / mask.sum().clamp(min=1)
        false_alarm = (predicted & ~mask).sum() / (~mask).sum().clamp(min=1)
    return total, {"loss": total.detach(), "stage": 2.0, "mse": mse.detach(), "mse_repaired": mse_repaired.detach(),
                   "ce_normal": normal_ce.detach(), "ce_corrupted": corrupted_ce.detach(),
                   "token_recall": recall, "token_false_alarm": false_alarm}


CROP_MARGIN_TOKENS = 2  # tokens encoded around a training window, so its features see their neighbours' pixels


def random_offset(side: int, window: int, generator: torch.Generator) -> list[int]:
    """Top-left token of a random window x window crop of a side x side token grid."""
    return torch.randint(0, side - window + 1, (2,), generator=generator).tolist()


def crop_tokens(t: torch.Tensor, offset: list[int], window: int, stride: int) -> torch.Tensor:
    """The window x window tokens at `offset` (top, left in tokens) of t's last two axes, where a token is `stride`
    pixels; clipped at the grid's edge."""
    (top, left), size = (o * stride for o in offset), window * stride
    return t[..., top:top + size, left:left + size]


def training_report(detector, buffer: SliceBuffer) -> dict:
    return codebook_report(detector, buffer)


def memory_per_slice_mb() -> float:
    return 24.0
