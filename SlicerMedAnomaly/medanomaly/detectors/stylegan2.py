"""StyleGAN2 reconstruction by latent optimisation, scored per patch by MSE or 1-D Wasserstein distance
(METHODS.md sections 2 and 3).

Networks in plain PyTorch ops (CPU or GPU): a mapping network, modulated/demodulated convolutions with per-layer
noise and skip connections to the output (the generator); a residual trunk shared by the discriminator and the
encoder E, which maps a slice to W+ offsets from the mean latent.

Detection inverts each batch of slices: W+ starts at E(x) and is refined by Adam (warm-up, cosine ramp-down) on
pixel MSE plus an SSIM term (MONAI), optionally with the noise maps (regularised as in the StyleGAN2 projector).
G(w) is the pseudo-healthy slice; the anomaly map is the per-patch Wasserstein distance (or MSE) between slice and
reconstruction, averaged over overlapping patches, inside the body.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from torch import nn

from . import register
from .base import Detector, DetectorOutput

DEFAULT_ARCHITECTURE = {
    "resolution": 128,  # slice size the generator makes (the model grid's size)
    "z_dim": 128,
    "w_dim": 128,
    "mapping_layers": 4,
    "channel_base": 2048,  # channels at resolution r: min(channel_base / r, channel_max)
    "channel_max": 128,
    "encoder_channel_max": 128,
    # inversion
    "inversion_steps": 20,  # Adam steps from E(x) (0: the encoder's reconstruction alone)
    "inversion_lr": 0.03,
    "inversion_warmup": 0.05,  # share of steps with a linear learning-rate ramp-up
    "inversion_rampdown": 0.25,  # share of steps with the cosine ramp-down
    "optimize_noise": False,  # also fit the noise maps (they can model anything, so off by default)
    "noise_regularization": 1e5,
    "ssim_weight": 0.1,  # perceptual term: weight of 1 - SSIM next to pixel MSE
    "latent_weight": 1e-3,  # pull of W+ towards the encoder's estimate (keeps the inversion on the normal manifold)
    # scoring
    "score": "wasserstein",  # or "mse"
    "patch_size": 16,  # pixels (the published 32 px at 512^2 is about 16 px on our 3.5 mm grid)
    "patch_stride": 4,
}


# ---------------------------------------------------------------------------------------------------------------
# Building blocks with equalised learning rate


class EqualLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_features), lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activation else out


class EqualConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True,
                 activation: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale, self.activation, self.down = 1 / math.sqrt(in_channels * kernel * kernel), activation, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.activation else x


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled by a style from w, then demodulated (weights renormalised per
    output channel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, *, demodulate: bool = True,
                 up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.scale, self.demodulate, self.up = 1 / math.sqrt(in_channels * kernel * kernel), demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # StyleGAN2's non-fused form, equal to convolving with per-sample modulated weights: scale the input by the
        # style, convolve with the shared weight, scale the output by the demodulation coefficients. Unlike a
        # grouped convolution it runs at full speed on CPUs.
        style = self.affine(w)  # [B, in]
        weight = self.scale * self.weight[0]  # [out, in, k, k]
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(x * style[:, :, None, None], weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            # sum over in, k, k of (weight * style)^2, per sample and output channel
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).T + 1e-8)  # [B, out]
            out = out * demod[:, :, None, None]
        return out


class StyledConv(nn.Module):
    """Modulated 3x3 convolution, per-pixel noise with a learned strength, bias and leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const",
                noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x, w)
        if noise is None and noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
        elif noise is None and noise_mode == "const":
            noise = self.noise_const
        if noise is not None:
            x = x + noise * self.noise_strength
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * math.sqrt(2)


class ToImage(nn.Module):
    def __init__(self, in_channels: int, w_dim: int, out_channels: int = 1):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


def channels_at(resolution: int, base: int, maximum: int) -> int:
    return int(min(base // resolution, maximum))


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, layers: int):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(dims[i], dims[i + 1], lr_mul=0.01, activation=True)
                                   for i in range(layers)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # pixel norm
        return self.net(z)


class Generator(nn.Module):
    """StyleGAN2 generator with skip connections to the output; W+ has 2 * log2(resolution / 2) rows."""

    def __init__(self, resolution: int = 128, z_dim: int = 128, w_dim: int = 128, mapping_layers: int = 4,
                 channel_base: int = 2048, channel_max: int = 128):
        super().__init__()
        levels = int(math.log2(resolution)) - 1  # 4, 8, ..., resolution
        if 2 ** (levels + 1) != resolution or levels < 2:
            raise ValueError(f"resolution {resolution} must be a power of two >= 8")
        self.resolution, self.z_dim, self.w_dim, self.num_ws = resolution, z_dim, w_dim, 2 * levels
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        c4 = channels_at(4, channel_base, channel_max)
        self.const = nn.Parameter(torch.randn(1, c4, 4, 4))
        self.convs = nn.ModuleList([StyledConv(c4, c4, w_dim, 4)])
        self.to_images = nn.ModuleList([ToImage(c4, w_dim)])
        for level in range(1, levels):
            res = 4 * 2 ** level
            cin, cout = channels_at(res // 2, channel_base, channel_max), channels_at(res, channel_base, channel_max)
            self.convs.append(StyledConv(cin, cout, w_dim, res, up=True))
            self.convs.append(StyledConv(cout, cout, w_dim, res))
            self.to_images.append(ToImage(cout, w_dim))

    def map(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """z [B, z_dim] -> W+ [B, num_ws, w_dim] (all rows equal), truncated towards the mean latent."""
        w = self.mapping(z)
        if truncation != 1.0:
            w = self.w_avg + truncation * (w - self.w_avg)
        return w[:, None].expand(-1, self.num_ws, -1)

    def mean_ws(self, batch: int) -> torch.Tensor:
        return self.w_avg[None, None].expand(batch, self.num_ws, -1).clone()

    def noise_buffers(self) -> list[torch.Tensor]:
        return [conv.noise_const for conv in self.convs]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", noises: list[torch.Tensor] | None = None):
        """W+ [B, num_ws, w_dim] -> image [B, 1, R, R] in [-1, 1] units (not clamped)."""
        b = ws.shape[0]
        x = self.const.expand(b, -1, -1, -1)
        noise = (lambda i: None) if noises is None else (lambda i: noises[i])  # noqa: E731
        x = self.convs[0](x, ws[:, 0], noise_mode, noise(0))
        image = self.to_images[0](x, ws[:, 1])
        for level in range(1, len(self.to_images)):
            i = 2 * level - 1
            x = self.convs[i](x, ws[:, i], noise_mode, noise(i))
            x = self.convs[i + 1](x, ws[:, i + 1], noise_mode, noise(i + 1))
            image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = image + self.to_images[level](x, ws[:, i + 2])
        return image


class ResidualTrunk(nn.Module):
    """Residual downsampling blocks from the image to 4x4 (StyleGAN2's discriminator architecture)."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int, in_channels: int = 1):
        super().__init__()
        self.from_image = EqualConv2d(in_channels, channels_at(resolution, channel_base, channel_max), 1)
        blocks = []
        res = resolution
        while res > 4:
            cin, cout = channels_at(res, channel_base, channel_max), channels_at(res // 2, channel_base, channel_max)
            blocks.append(nn.ModuleDict({"conv0": EqualConv2d(cin, cin, 3), "conv1": EqualConv2d(cin, cout, 3, down=True),
                                         "skip": EqualConv2d(cin, cout, 1, bias=False, activation=False, down=True)}))
            res //= 2
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = channels_at(4, channel_base, channel_max)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x = self.from_image(x)
        features = []
        for block in self.blocks:
            x = (block["skip"](x) + block["conv1"](block["conv0"](x))) / math.sqrt(2)
            features.append(x)
        return (x, features) if return_features else x


class Encoder(nn.Module):
    """E: slice [B, 1, R, R] in [-1, 1] units -> W+ offsets from the generator's mean latent."""

    def __init__(self, resolution: int, num_ws: int, w_dim: int, channel_base: int, channel_max: int):
        super().__init__()
        self.trunk = ResidualTrunk(resolution, channel_base, channel_max)
        c = self.trunk.out_channels
        self.head = nn.Sequential(nn.Flatten(), EqualLinear(c * 16, 4 * w_dim, activation=True),
                                  EqualLinear(4 * w_dim, num_ws * w_dim))
        self.num_ws, self.w_dim = num_ws, w_dim
        nn.init.zeros_(self.head[-1].weight)  # starts at the mean latent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).reshape(-1, self.num_ws, self.w_dim)


def build_generator(arch: dict) -> Generator:
    return Generator(arch["resolution"], arch["z_dim"], arch["w_dim"], arch["mapping_layers"],
                     arch["channel_base"], arch["channel_max"])


def build_encoder(arch: dict, num_ws: int) -> Encoder:
    return Encoder(arch["resolution"], num_ws, arch["w_dim"], arch["channel_base"], arch["encoder_channel_max"])


# ---------------------------------------------------------------------------------------------------------------
# Patch scores, vectorised


def patch_wasserstein(a: torch.Tensor, b: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """1-D Wasserstein distance between the intensity distributions of a and b in every size x size window at the
    given stride: [B, 1, H, W] x2 -> [B, nH, nW]. With equal sample sizes W1 is the mean absolute difference of the
    sorted values, so one sort per window does it (unfold, no Python loop over windows)."""
    pa, pb = F.unfold(a, size, stride=stride), F.unfold(b, size, stride=stride)  # [B, size^2, L]
    wd = (pa.sort(dim=1).values - pb.sort(dim=1).values).abs().mean(dim=1)
    return wd.reshape(a.shape[0], (a.shape[-2] - size) // stride + 1, (a.shape[-1] - size) // stride + 1)


def patch_mse(a: torch.Tensor, b: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    return F.avg_pool2d((a - b).pow(2), size, stride=stride)[:, 0]


def patches_to_pixels(patch_scores: torch.Tensor, shape: tuple[int, int], size: int, stride: int) -> torch.Tensor:
    """Spread each window's score over its pixels and average where windows overlap: [B, nH, nW] -> [B, 1, H, W]."""
    b = patch_scores.shape[0]
    values = patch_scores.reshape(b, 1, -1).expand(-1, size * size, -1)
    summed = F.fold(values, shape, size, stride=stride)
    count = F.fold(torch.ones_like(values[:1]), shape, size, stride=stride)
    return summed / count.clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Inversion


def ramped_lr(step: int, steps: int, base: float, warmup: float, rampdown: float) -> float:
    """The StyleGAN2 projector's schedule: linear warm-up, flat, cosine ramp-down to zero."""
    t = step / max(steps, 1)
    ramp = min(1.0, (1.0 - t) / max(rampdown, 1e-8))
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return base * ramp * min(1.0, t / max(warmup, 1e-8))


def noise_regularization(noises: list[torch.Tensor]) -> torch.Tensor:
    """Autocorrelation penalty of the noise maps at every scale (StyleGAN2 projector)."""
    total = 0.0
    for noise in noises:
        n = noise
        while True:
            total = total + (n * torch.roll(n, 1, dims=3)).mean() ** 2 + (n * torch.roll(n, 1, dims=2)).mean() ** 2
            if n.shape[-1] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return total


class Inversion:
    """Batched GAN inversion: W+ (and optionally the noise maps) fitted to target slices by Adam."""

    def __init__(self, generator: Generator, arch: dict):
        self.g, self.arch = generator, arch
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0, win_size=7, reduction="none")  # 1 - SSIM per slice

    def distance(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-slice pixel MSE plus the weighted SSIM term (both in [-1, 1] image units)."""
        mse = (output - target).pow(2).mean(dim=(1, 2, 3))
        if self.arch["ssim_weight"] <= 0:
            return mse
        return mse + self.arch["ssim_weight"] * self.ssim(output, target).reshape(-1)

    def run(self, target: torch.Tensor, ws_init: torch.Tensor, steps: int | None = None,
            record: list | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """target [B, 1, R, R] in [-1, 1]; returns the fitted W+ (and noise maps). `record` collects the mean
        pixel MSE before every step and after the last."""
        steps = self.arch["inversion_steps"] if steps is None else steps
        with torch.inference_mode(False), torch.enable_grad():
            target = target.detach().clone()
            anchor = ws_init.detach().clone()
            ws = anchor.clone().requires_grad_(True)
            params = [ws]
            noises = None
            if self.arch["optimize_noise"]:
                noises = [torch.randn(target.shape[0], 1, n.shape[-2], n.shape[-1], device=target.device,
                                      requires_grad=True) for n in self.g.noise_buffers()]
                params += noises
            optimizer = torch.optim.Adam(params, lr=self.arch["inversion_lr"], betas=(0.9, 0.999))
            self.g.requires_grad_(False)
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = ramped_lr(step, steps, self.arch["inversion_lr"], self.arch["inversion_warmup"],
                                            self.arch["inversion_rampdown"])
                output = self.g(ws, noise_mode="const" if noises is None else "none", noises=noises)
                loss = self.distance(output, target).sum()
                loss = loss + self.arch["latent_weight"] * (ws - anchor).pow(2).sum(dim=(1, 2)).sum()
                if noises is not None:
                    loss = loss + self.arch["noise_regularization"] * noise_regularization(noises)
                if record is not None:
                    record.append(float((output.detach() - target).pow(2).mean()))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if noises is not None:  # re-normalise the noise maps
                    with torch.no_grad():
                        for n in noises:
                            n -= n.mean(dim=(1, 2, 3), keepdim=True)
                            n *= torch.rsqrt(n.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
            if record is not None:
                with torch.no_grad():
                    out = self.g(ws, noise_mode="const" if noises is None else "none", noises=noises)
                    record.append(float((out - target).pow(2).mean()))
        return ws.detach(), None if noises is None else [n.detach() for n in noises]


@register
class StyleGAN2Detector(Detector):
    method = "stylegan2"
    cpu_batch_slices = None  # each batch is one inversion (Adam on the batch loss): same batches on every device

    def __init__(self, card: dict):
        super().__init__(card)
        self.arch = arch = {**DEFAULT_ARCHITECTURE, **card.get("architecture", {})}
        if arch["resolution"] != self.spec.size:
            raise ValueError(f"generator resolution {arch['resolution']} differs from the input size {self.spec.size}")
        self.generator = build_generator(arch)
        self.encoder = build_encoder(arch, self.generator.num_ws)
        self.inversion = Inversion(self.generator, arch)  # no parameters of its own

    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        """E(x): W+ [B, num_ws, w_dim] for slices in [0, 1]."""
        return self.generator.w_avg[None, None] + self.encoder(image01 * 2 - 1)

    def invert(self, image01: torch.Tensor, steps: int | None = None, record: list | None = None):
        """Fitted W+ and the reconstruction in [0, 1] of slices in [0, 1]."""
        ws, noises = self.inversion.run(image01 * 2 - 1, self.encode(image01), steps, record)
        reconstruction = self.generator(ws, noise_mode="const" if noises is None else "none", noises=noises)
        return ws, ((reconstruction + 1) / 2).clamp(0, 1)

    def patch_scores(self, image01: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        size, stride = int(self.arch["patch_size"]), int(self.arch["patch_stride"])
        if self.arch["score"] == "mse":
            return patch_mse(image01, reconstruction, size, stride)
        if self.arch["score"] != "wasserstein":
            raise ValueError(f"score {self.arch['score']!r}: use wasserstein or mse")
        return patch_wasserstein(image01, reconstruction, size, stride)

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        assert image.ndim == 4 and image.shape[1] == 1, f"expected [B, 1, H, W], got {tuple(image.shape)}"
        image = image.float()
        _, reconstruction = self.invert(image)
        size, stride = int(self.arch["patch_size"]), int(self.arch["patch_stride"])
        patches = self.patch_scores(image, reconstruction)
        pixel = patches_to_pixels(patches, tuple(image.shape[-2:]), size, stride) * region
        return DetectorOutput(score=pixel, reconstruction=reconstruction, slice_score=self.slice_score(patches, region))

    def slice_score(self, patches: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """The highest-scoring window at least half inside the region: [B, nH, nW] -> [B]."""
        size, stride = int(self.arch["patch_size"]), int(self.arch["patch_stride"])
        inside = F.avg_pool2d(region.float(), size, stride=stride)[:, 0] >= 0.5
        return torch.where(inside, patches, torch.zeros_like(patches)).flatten(1).max(1).values
