"""Trainer of the StyleGAN2 generator on normal slices (`--method stylegan2`); the encoder follows with
`--method stylegan2-encoder`.

Steps alternate between the discriminator (even steps) and the generator (odd steps) in one Adam optimizer with a
parameter group each: the phase that is not trained gets no gradients, so Adam leaves it alone.

- Losses: non-saturating logistic; lazy R1 on reals every 16 discriminator steps; lazy path-length regularisation
  every 4 generator steps; an exponential moving average of the generator (the one that ships).
- Differentiable augmentation (translation, cutout, brightness, contrast) of reals and fakes before the
  discriminator, for small datasets.

GPU recipe for full resolution (not run here; documented in the README): 512^2 slices, channel_base 16384,
channel_max 512, batch 32, R1 gamma 10 at 512^2, 5,000 kimg on one A100/H100: about 2-3 days.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..detectors.stylegan2 import DEFAULT_ARCHITECTURE, EqualConv2d, EqualLinear, ResidualTrunk, channels_at
from .data import SliceBuffer

UNUSED_PARAMETERS = True  # each phase leaves the other network out of the graph (DDP must know)
GAN_DEFAULTS = {
    "r1_gamma": 0.2,  # ADA's heuristic 0.0002 * resolution^2 / batch
    "r1_interval": 16,
    "pl_weight": 2.0,
    "pl_interval": 4,
    "ema_kimg": 0.5,  # half-life of the generator average, thousands of images
    "augment_probability": 0.5,
    "d_channel_max": 128,
}


def architecture(overrides: dict) -> dict:
    return {**DEFAULT_ARCHITECTURE, **GAN_DEFAULTS, **overrides}


class Discriminator(nn.Module):
    """Residual discriminator: trunk to 4x4, minibatch standard deviation, convolution, two dense layers."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int):
        super().__init__()
        self.trunk = ResidualTrunk(resolution, channel_base, channel_max)
        c = channels_at(4, channel_base, channel_max)
        self.conv = EqualConv2d(c + 1, c, 3)
        self.fc = EqualLinear(c * 16, c, activation=True)
        self.out = EqualLinear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        group = min(4, x.shape[0])
        while x.shape[0] % group:
            group -= 1
        y = x.reshape(group, -1, *x.shape[1:])
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B / group]
        std = std.repeat(group)[:, None, None, None].expand(-1, 1, *x.shape[-2:])
        x = self.conv(torch.cat([x, std], 1))
        return self.out(self.fc(x.flatten(1)))[:, 0]


class GANPair(nn.Module):
    """What the optimizer trains and the checkpoint holds: generator, discriminator, and the generator average
    (the detector's generator, never trained directly)."""

    def __init__(self, detector, arch: dict):
        super().__init__()
        from ..detectors.stylegan2 import build_generator

        self.g = build_generator(arch)
        self.g.load_state_dict(detector.generator.state_dict())
        self.d = Discriminator(arch["resolution"], arch["channel_base"], arch["d_channel_max"])
        self.ema = detector.generator
        self.ema.requires_grad_(False)
        self.arch = arch
        self.register_buffer("pl_mean", torch.zeros(()))
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.float64))


def trainable(detector) -> nn.Module:
    return GANPair(detector, detector.arch)


def optimizer(model: GANPair, config) -> torch.optim.Optimizer:
    """Adam with StyleGAN2's betas, one group per network, with the lazy-regularisation correction of lr and betas."""
    groups = []
    for params, interval in ((model.g.parameters(), model.arch["pl_interval"]),
                             (model.d.parameters(), model.arch["r1_interval"])):
        c = interval / (interval + 1)
        groups.append({"params": list(params), "lr": config.learning_rate * c, "base_lr": config.learning_rate * c,
                       "betas": (0.0, 0.99 ** c)})
    return torch.optim.Adam(groups, eps=1e-8)


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Bilinear translation of each slice by (dx, dy) pixels, zeros outside: out[i, j] = x[i + dy, j + dx]. The same
    as F.grid_sample with a translation-only affine grid (align_corners=False, zero padding), but made of padding and
    indexing, which have gradients of every order on every device: the R1 penalty differentiates the discriminator's
    gradient through this augmentation, and CUDA's grid sampler has no second derivative."""
    b, _, h, w = x.shape
    pad = int(math.ceil(max(float(dx.abs().max()), float(dy.abs().max())))) + 1
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # [B, H', W', C]: one index picks a pixel
    dx, dy = dx.to(x.device, x.dtype), dy.to(x.device, x.dtype)
    bx, by = torch.floor(dx), torch.floor(dy)
    fx, fy = (dx - bx).view(b, 1, 1, 1), (dy - by).view(b, 1, 1, 1)
    rows = torch.arange(h, device=x.device)[None] + by.long()[:, None] + pad  # [B, H]
    cols = torch.arange(w, device=x.device)[None] + bx.long()[:, None] + pad  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    tap = lambda r, c: padded[batch, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)  # noqa: E731
    return ((1 - fy) * ((1 - fx) * tap(rows, cols) + fx * tap(rows, cols + 1))
            + fy * ((1 - fx) * tap(rows + 1, cols) + fx * tap(rows + 1, cols + 1)))


def diff_augment(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Differentiable augmentation (Zhao et al. 2020): brightness, contrast, translation by up to 1/8, cutout of a
    quarter, each slice with probability p."""
    b = x.shape[0]
    apply = (torch.rand(b, 1, 1, 1, generator=generator) < p).to(x.device, x.dtype)
    brightness = (torch.rand(b, 1, 1, 1, generator=generator).to(x.device) - 0.5) * 0.4
    contrast = (torch.rand(b, 1, 1, 1, generator=generator).to(x.device) + 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    y = (x - mean) * contrast + mean + brightness
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * 0.25  # grid units: 1/8 of the image
    y = translate(y + 1, shift[:, 0] * x.shape[-1] / 2, shift[:, 1] * x.shape[-2] / 2) - 1  # -1 (black) outside
    size = x.shape[-1]
    centre = torch.randint(0, size, (b, 2), generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cut = ((yy[None] - centre[:, 0, None, None]).abs() < size // 4) & ((xx[None] - centre[:, 1, None, None]).abs() < size // 4)
    y = y * (~cut[:, None]).to(x.device, x.dtype) + (-1.0) * cut[:, None].to(x.device, x.dtype)
    return apply * y + (1 - apply) * x


@torch.no_grad()
def update_ema(model: GANPair, batch: int, ema_kimg: float) -> None:
    ema_images = min(ema_kimg * 1000, float(model.images_seen) * 0.05)  # ramp-up: average over recent images early
    beta = 0.5 ** (batch / max(ema_images, 1e-8))
    for p_ema, p in zip(model.ema.parameters(), model.g.parameters()):
        p_ema.copy_(p.lerp(p_ema, beta))
    for b_ema, b in zip(model.ema.buffers(), model.g.buffers()):
        b_ema.copy_(b)


def loss(model: GANPair, images: torch.Tensor, regions: torch.Tensor, generator: torch.Generator, *, step: int,
         config):
    arch = model.arch
    g, d = model.g, model.d
    b = images.shape[0]
    device = images.device
    real = images * 2 - 1
    z = torch.randn(b, g.z_dim, generator=generator).to(device)
    phase = step // 2
    if step % 2 == 0:  # discriminator
        d.requires_grad_(True)
        g.requires_grad_(False)
        with torch.no_grad():
            ws = g.map(z)
            fake = g(ws, noise_mode="random")
            g.w_avg.copy_(ws[:, 0].mean(0).lerp(g.w_avg, 0.995))  # tracked mean latent
        logits_fake = d(diff_augment(fake, generator, arch["augment_probability"]))
        r1 = phase % arch["r1_interval"] == 0
        real_in = real.detach().requires_grad_(r1)
        logits_real = d(diff_augment(real_in, generator, arch["augment_probability"]))
        d_loss = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
        total = d_loss
        parts = {"d_loss": d_loss.detach(), "real_score": logits_real.detach().mean(),
                 "fake_score": logits_fake.detach().mean()}
        if r1:
            grad, = torch.autograd.grad(logits_real.sum(), real_in, create_graph=True)
            penalty = grad.pow(2).sum(dim=(1, 2, 3)).mean()
            total = total + penalty * (arch["r1_gamma"] / 2) * arch["r1_interval"]
            parts["r1"] = penalty.detach()
        model.images_seen += b
        model.last_d_parts = parts  # reported with the next generator step's
        return total, parts
    # generator
    d.requires_grad_(False)
    g.requires_grad_(True)
    update_ema(model, b, arch["ema_kimg"])
    ws = g.map(z)
    fake = g(ws, noise_mode="random")
    g_loss = F.softplus(-d(diff_augment(fake, generator, arch["augment_probability"]))).mean()
    total, parts = g_loss, {"g_loss": g_loss.detach(), **getattr(model, "last_d_parts", {})}
    if phase % arch["pl_interval"] == 0:
        half = max(1, b // 2)
        ws_pl = g.map(z[:half])
        out = g(ws_pl, noise_mode="random")
        noise = torch.randn(out.shape, generator=generator).to(device) / math.sqrt(out.shape[-1] * out.shape[-2])
        grad, = torch.autograd.grad((out * noise).sum(), ws_pl, create_graph=True)
        lengths = grad.pow(2).sum(2).mean(1).sqrt()
        with torch.no_grad():
            model.pl_mean.copy_(model.pl_mean.lerp(lengths.mean(), 0.01))
        penalty = (lengths - model.pl_mean).pow(2).mean()
        total = total + penalty * arch["pl_weight"] * arch["pl_interval"]
        parts["path_length"] = penalty.detach()
    return total, parts


@torch.no_grad()
def training_report(detector, buffer: SliceBuffer) -> dict:
    """How far the average generator's samples are from real slices: the mean intensity histogram distance."""
    g = detector.generator.eval()
    z = torch.randn(64, g.z_dim, generator=torch.Generator().manual_seed(0))
    fake = ((g(g.map(z)) + 1) / 2).clamp(0, 1)
    real = buffer.images[:64]
    hist = lambda x: torch.histc(x, 32, 0, 1) / x.numel()  # noqa: E731
    return {"samples": {"histogram_l1_to_real_32_bins": round(float((hist(fake) - hist(real)).abs().sum()), 4)}}


def memory_per_slice_mb() -> float:
    return 64.0
