"""Trainer of the StyleGAN2 encoder E (`--method stylegan2-encoder`, started from a stylegan2 bundle with
`init_from`): the generator is frozen and only E learns.

1. Synthetic pairs (w, G(w)) with W+ targets (style-mixed latents, so that the rows differ): E(G(w)) -> w, on the
   latent MSE (METHODS.md section 3).
2. Real normal slices: G(E(x)) -> x on pixel MSE plus the SSIM term, with a small pull towards the mean latent.

The result is a complete stylegan2 bundle whose inversion starts from E(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..detectors.stylegan2 import DEFAULT_ARCHITECTURE
from .data import SliceBuffer, augment

INIT_PREFIXES = ("generator.",)  # --init-from: the frozen generator E is trained for

CARD_METHOD = "stylegan2"
ENCODER_DEFAULTS = {
    "synthetic_fraction": 0.5,  # share of the steps on synthetic pairs
    "encoder_latent_weight": 1e-3,  # pull of E(x) towards the mean latent on real slices
}


def architecture(overrides: dict) -> dict:
    return {**DEFAULT_ARCHITECTURE, **ENCODER_DEFAULTS, **overrides}


class EncoderTraining(nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        detector.generator.requires_grad_(False).eval()


def trainable(detector) -> nn.Module:
    return EncoderTraining(detector)


def mixed_latents(g, batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """W+ from two mapped latents, crossing over at a random row, truncated by a random factor in [0.5, 1]."""
    z = torch.randn(2, batch, g.z_dim, generator=generator).to(device)
    psi = 0.5 + 0.5 * torch.rand(batch, 1, 1, generator=generator).to(device)
    w1, w2 = g.map(z[0]), g.map(z[1])
    cut = torch.randint(1, g.num_ws + 1, (batch, 1, 1), generator=generator).to(device)
    rows = torch.arange(g.num_ws, device=device)[None, :, None]
    ws = torch.where(rows < cut, w1, w2)
    return g.w_avg + psi * (ws - g.w_avg)


def loss(model: EncoderTraining, images: torch.Tensor, regions: torch.Tensor, generator: torch.Generator, *,
         step: int, config):
    detector = model.detector
    g, arch = detector.generator, detector.arch
    if step < int(arch["synthetic_fraction"] * config.steps):
        with torch.no_grad():
            ws = mixed_latents(g, images.shape[0], generator, images.device)
            x01 = ((g(ws, noise_mode="const") + 1) / 2).clamp(0, 1)
        predicted = detector.encode(x01)
        latent = F.mse_loss(predicted, ws)
        return latent, {"loss": latent.detach(), "stage": 1.0, "latent_mse": latent.detach()}
    x01 = augment(images, generator)
    predicted = detector.encode(x01)
    output = g(predicted, noise_mode="const")
    target = x01 * 2 - 1
    distance = detector.inversion.distance(output, target).mean()
    pull = (predicted - g.w_avg).pow(2).sum(dim=(1, 2)).mean()
    total = distance + arch["encoder_latent_weight"] * pull
    with torch.no_grad():
        mse = (output - target).pow(2).mean()
    return total, {"loss": total.detach(), "stage": 2.0, "pixel_mse": mse}


@torch.no_grad()
def training_report(detector, buffer: SliceBuffer) -> dict:
    """Pixel MSE ([-1, 1] units) of G(E(x)) on the training slices."""
    g = detector.generator.eval()
    errors = []
    for start in range(0, min(len(buffer), 256), 32):
        x01 = buffer.images[start:start + 32]
        errors.append(float((g(detector.encode(x01)) - (x01 * 2 - 1)).pow(2).mean()))
    return {"encoder": {"training_pixel_mse": round(sum(errors) / len(errors), 5)}}


def memory_per_slice_mb() -> float:
    return 64.0
