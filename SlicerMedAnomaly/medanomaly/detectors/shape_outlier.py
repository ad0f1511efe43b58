"""3D shape outlier: bright blobs where normal tissue of the same class has none.

A slice-wise network sees a nodule and a vessel cut across as the same bright disc. In 3D they differ: a vessel is a
tube, curved across its axis and flat along it, while a nodule is curved in every direction. The Hessian of the
Gaussian-smoothed HU volume says which: its three eigenvalues are all strongly negative only at a bright blob. This
method takes, at every pixel of a slice and at several scales, the scale-normalized blobness sigma^2 * max(0,
-lambda_max), lambda_max being the largest of the three eigenvalues (the one a tube has near zero), computed from
the slice and its context slices on each side. What is normal comes from normal CT: each pixel's tissue class is
decided by a wide local mean of HU (as in the HU-outlier baseline), and its blobness is divided by a high quantile of
the blobness of normal tissue in that class. In the lung, where normal anatomy is tubes, the quantile is small and a
nodule stands out; in soft tissue and bone, where blobs are everywhere, it is large. The shipped model scores the
lungs only (input.region "lung").

With architecture.shape "tube" it takes the middle eigenvalue instead, which is strongly negative for bright tubes
(and balls): thin dense lines such as a metal needle, far denser than any normal tube of its tissue class when the
HU window keeps metal.

It learns no network: like the HU-outlier baseline it is statistics of normal CT, fitted in seconds. As "blob" it
finds round lesions, not thin ones (needles are tubes) nor diffuse ones (ground glass over a lobe is flat).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..preprocess import unwindow
from . import register
from .base import Detector, DetectorOutput
from .hu_outlier import DEFAULT_ARCHITECTURE as HU_OUTLIER_ARCHITECTURE
from .hu_outlier import mean_width, tissue_classes

DEFAULT_ARCHITECTURE = {
    "sigmas_mm": [2.0, 3.0, 4.0],  # scales of the Gaussian derivatives: blobs of about 5-14 mm across respond most
    "context_mm": 35.0,  # width of the local mean that decides the tissue class
    "class_edges_hu": HU_OUTLIER_ARCHITECTURE["class_edges_hu"],  # the HU-outlier baseline's tissue classes
    "quantile": 0.999,  # the high quantile of normal blobness per class that a score of 1 means
    "spread": True,  # each scale's response spread over the disc of the blob it answers (see blobness)
    "shape": "blob",  # "blob": bright balls (all three curvatures); "tube": bright tubes and balls (two of three)
}


def gaussian_kernels(positions_mm: torch.Tensor, sigma_mm: float) -> torch.Tensor:
    """[3, n] sampled Gaussian (sum 1) and its first and second derivatives (per mm), at the given positions. The
    second derivative is corrected to sum to 0, so that a constant image has no curvature even where the kernel is
    truncated (few context slices)."""
    x = positions_mm.double()
    g = torch.exp(-0.5 * (x / sigma_mm) ** 2)
    total = g.sum()
    g1 = -x / sigma_mm**2 * g / total
    g2 = (x**2 / sigma_mm**4 - 1 / sigma_mm**2) * g / total
    g = g / total
    g2 = g2 - g2.sum() * g
    # exact on polynomials up to second order however the kernel is truncated: a ramp x has slope 1 and x^2 / 2 has
    # curvature 1 (torch's conv2d correlates, so the first derivative of x is sum(x * g1))
    g1 = g1 / (g1 * x).sum()
    g2 = g2 / (0.5 * (g2 * x * x).sum())
    return torch.stack([g, g1, g2]).float()


def eigenvalues(a11: torch.Tensor, a22: torch.Tensor, a33: torch.Tensor, a12: torch.Tensor, a13: torch.Tensor,
                a23: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (largest, middle, smallest) of symmetric 3x3 matrices given elementwise by their six entries, in
    closed form (the trigonometric solution of the characteristic cubic): several times faster than a batched
    eigvalsh over every pixel, and as exact in float32 to about 1e-4 of the matrix's scale."""
    q = (a11 + a22 + a33) / 3
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    off = a12 * a12 + a13 * a13 + a23 * a23
    p = torch.sqrt(((b11 * b11 + b22 * b22 + b33 * b33 + 2 * off) / 6).clamp_min(1e-30))
    det = (b11 * (b22 * b33 - a23 * a23) - a12 * (a12 * b33 - a23 * a13) + a13 * (a12 * a23 - b22 * a13))
    angle = torch.acos((det / (2 * p**3)).clamp(-1.0, 1.0)) / 3
    largest = q + 2 * p * torch.cos(angle)
    smallest = q + 2 * p * torch.cos(angle + 2 * math.pi / 3)
    return largest, 3 * q - largest - smallest, smallest


def correlate_channels(image: torch.Tensor, kernels: torch.Tensor, dim: int) -> torch.Tensor:
    """Each channel of `image` [B, C, H, W] correlated along `dim` (2 or 3) with its own 1D kernel (`kernels` [C,
    n]), without padding (the output is n - 1 shorter along `dim`). Shifted multiply-adds: on a CPU about 6x faster
    than the equivalent grouped conv2d of [n, 1] or [1, n] kernels, whose im2col does not pay for so few taps."""
    taps = kernels.shape[1]
    length = image.shape[dim] - taps + 1
    weights = kernels.to(image)[None, :, :, None, None].movedim(2, 0)  # [n, 1, C, 1, 1]
    out = image.narrow(dim, 0, length) * weights[0]
    for tap in range(1, taps):
        out.addcmul_(image.narrow(dim, tap, length), weights[tap])
    return out


def maximum_filter(image: torch.Tensor, radius: int) -> torch.Tensor:
    """The maximum over the (2 radius + 1)^2 square around each pixel of [B, C, H, W] (of the pixels inside the
    image), separably by shifted elementwise maxima: the same values as max_pool2d, about 20x faster on a CPU."""
    out = image
    for dim in (2, 3):
        source, out, length = out, out.clone(), image.shape[dim]
        for shift in range(1, min(radius, length - 1) + 1):
            ahead = out.narrow(dim, 0, length - shift)
            torch.maximum(ahead, source.narrow(dim, shift, length - shift), out=ahead)
            behind = out.narrow(dim, shift, length - shift)
            torch.maximum(behind, source.narrow(dim, 0, length - shift), out=behind)
    return out


# The derivative orders (0, 1, 2) along S, P and L of the Hessian entries zz, yy, xx, zy, zx, yx.
HESSIAN_Z_ORDER = [2, 0, 0, 1, 1, 0]
HESSIAN_Y_ORDER = [0, 2, 0, 1, 0, 1]
HESSIAN_X_ORDER = [0, 0, 2, 0, 1, 1]


def kernel_half_width(sigma_mm: float, spacing_mm: float) -> int:
    """Pixels on each side of the in-plane Gaussian derivative kernels (3 sigma)."""
    return max(1, math.ceil(3 * sigma_mm / spacing_mm))


def spread_radius(sigma_mm: float, spacing_mm: float) -> int:
    """Pixels over which a scale's response is spread: the radius sigma * sqrt(3) of the blob it answers most."""
    return int(round(sigma_mm * math.sqrt(3) / spacing_mm))


def blobness(hu: torch.Tensor, sigmas_mm, spacing_mm: float, slice_mm: float, spread: bool = False,
             shape: str = "blob") -> torch.Tensor:
    """hu: [B, C, H, W], C = 2k + 1 slices along S (the middle one scored), `slice_mm` apart, pixels of `spacing_mm`.
    Returns [B, 1, H, W]: the largest over scales of sigma^2 * max(0, -lambda_max) of the Hessian at the middle
    slice. With `shape` "tube", the middle eigenvalue instead: strongly negative for bright tubes and blobs alike.
    With `spread`, each scale's response is first spread (a square maximum filter) over the disc of the blob it
    answers most, so that a finding covers the blob rather than its centre."""
    b, c, h, w = hu.shape
    k = c // 2
    z_positions = (torch.arange(c, device=hu.device) - k) * slice_mm
    best = hu.new_zeros((b, 1, h, w))
    for sigma in sigmas_mm:
        zk = gaussian_kernels(z_positions, sigma).to(hu)  # [3, C]
        along_z = torch.einsum("dc,bchw->bdhw", zk, hu)  # smoothed, first and second derivative along S
        half, radius = kernel_half_width(sigma, spacing_mm), spread_radius(sigma, spacing_mm)
        pk = gaussian_kernels(torch.arange(-half, half + 1, device=hu.device) * spacing_mm, sigma).to(hu)
        padded = F.pad(along_z, (half, half, half, half), mode="replicate")
        # the six Hessian entries as separable filters, all six at once along P, then along L
        image = correlate_channels(padded[:, HESSIAN_Z_ORDER], pk[HESSIAN_Y_ORDER], dim=2)
        hzz, hyy, hxx, hzy, hzx, hyx = correlate_channels(image, pk[HESSIAN_X_ORDER], dim=3).unbind(1)
        largest, middle, _ = eigenvalues(hzz, hyy, hxx, hzy, hzx, hyx)
        response = sigma**2 * (-(middle if shape == "tube" else largest)).clamp_min(0)[:, None]
        if spread:  # over the disc of the blob that this scale answers most (radius sigma * sqrt(3))
            response = maximum_filter(response, radius)
        best = torch.maximum(best, response)
    return best


@register
class ShapeOutlierDetector(Detector):
    method = "shape-outlier"
    supports_context = True
    mixed_precision = False  # eigenvalues in float32
    cpu_batch_slices = 8

    def __init__(self, card: dict):
        super().__init__(card)
        arch = {**DEFAULT_ARCHITECTURE, **card.get("architecture", {})}
        if self.spec.context_slices < 1:
            raise ModelError("method shape-outlier needs input.context_slices >= 1 (the Hessian looks across slices); "
                             "train it with --input-json '{\"context_slices\": 3}' (3 at 2 mm slices: +-6 mm)")
        self.sigmas_mm = [float(s) for s in arch["sigmas_mm"]]
        self.context_px = round(float(arch["context_mm"]) / self.spec.spacing_mm)
        self.quantile = float(arch["quantile"])
        self.spread = bool(arch["spread"])
        self.shape = str(arch["shape"])
        if self.shape not in ("blob", "tube"):
            raise ModelError(f"architecture.shape {self.shape!r}: use blob or tube")
        edges = torch.tensor(arch["class_edges_hu"], dtype=torch.float32)
        self.register_buffer("class_edges", edges)
        self.register_buffer("class_scale", torch.ones(len(edges) - 1))
        # how far in plane a pixel's score looks: the derivative kernels and the spread, and the tissue class's mean
        self.reach_px = max([kernel_half_width(s, self.spec.spacing_mm) + self.spread * spread_radius(
            s, self.spec.spacing_mm) for s in self.sigmas_mm] + [mean_width(self.context_px) // 2])

    def features(self, image: torch.Tensor, slice_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Tissue class index (of the middle slice) and blobness of every pixel; image [B, C, H, W] in window
        units."""
        hu = unwindow(image.float(), self.spec.window_hu)
        middle = hu[:, self.spec.context_slices:self.spec.context_slices + 1]
        response = blobness(hu, self.sigmas_mm, self.spec.spacing_mm, slice_mm, self.spread, self.shape)
        return tissue_classes(middle, self.context_px, self.class_edges), response

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        assert image.ndim == 4 and image.shape[1] == self.spec.channels, \
            f"expected [B, {self.spec.channels}, H, W], got {tuple(image.shape)}"
        slice_mm = self.slice_spacing_mm or self.spec.slice_mm or self.spec.spacing_mm
        score = image.new_zeros((image.shape[0], 1) + image.shape[2:], dtype=torch.float32)
        box = region_box(region, self.reach_px)
        if box is not None:  # only around the region, which is all that is scored: the same values, less work
            classes, blob = self.features(image[..., box[0], box[1]], slice_mm)
            score[..., box[0], box[1]] = blob / self.class_scale[classes] * region[..., box[0], box[1]]
        return DetectorOutput(score=score)


def region_box(region: torch.Tensor, margin: int) -> tuple[slice, slice] | None:
    """Rows and columns of [B, 1, H, W] `region`'s bounding box over the batch, widened by `margin` pixels on each
    side (within the image); None where the region is empty. A filter that reaches no further than `margin` gives
    the same values inside the region on this crop as on the whole image: its edge effects stay in the margin."""
    rows = torch.nonzero(region.flatten(0, 1).any(0).any(1))[:, 0]
    cols = torch.nonzero(region.flatten(0, 1).any(0).any(0))[:, 0]
    if rows.numel() == 0:
        return None
    h, w = region.shape[-2:]
    return (slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, h)),
            slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, w)))
