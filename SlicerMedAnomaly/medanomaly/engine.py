"""The volume engine: runs any Detector over the slices of a volume and maps its maps back to the input grid.

It batches slices within a memory budget, picks the device, reports progress, honours cancellation and smooths the
slice-wise maps in 3D with a spacing-aware Gaussian. It knows no method by name.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .detectors.base import Detector
from .errors import Cancelled, InputError
from .preprocess import InputSpec, ModelSlices, with_context

ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]
# Activation memory per 128x128 slice in the forward pass of the shipped networks, measured, with headroom.
DEFAULT_SLICE_MEMORY_MB = 24.0


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple MPS, when present; an explicit device that is absent is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is visible to torch {torch.__version__}; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: Apple MPS is not available here; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise InputError(f"--device {name}: unknown device; use auto, cpu, cuda or mps")
    return torch.device(name)


def batch_size_for(spec: InputSpec, memory_budget_mb: float, per_slice_mb: float) -> int:
    scale = (spec.size / 128.0) ** 2
    return int(max(1, min(256, memory_budget_mb // (per_slice_mb * scale))))


@dataclass
class EngineTimings:
    network_s: float = 0.0
    batches: int = 0
    batch_size: int = 0
    device: str = "cpu"
    slice_scores: np.ndarray | None = None  # [Z] image-level scores, from detectors that make them
    slices: int = 0  # model slices scored
    slice_spacing_mm: float = 0.0  # their spacing along S (thin input slices are averaged to the card's slice_mm)


def network_precision(device: torch.device, mixed_precision: bool = True):
    """The context every network call runs in: float16 autocast on CUDA (unless `mixed_precision` is False), else
    nothing."""
    if device.type == "cuda" and mixed_precision:
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def score_batch(detector: Detector, image: torch.Tensor, region: torch.Tensor, device: torch.device,
                mixed_precision: bool = True):
    """One batch through the detector on `device`: image [B, H, W] (or [B, C, H, W] with context slices) in window
    units, region [B, H, W] bool."""
    if image.ndim == 3:
        image = image[:, None]
    with torch.inference_mode(), network_precision(device, mixed_precision):
        return detector.score(image.to(device), region[:, None].to(device))


def run_detector(detector: Detector, slices: ModelSlices, *, device: torch.device,
                 memory_budget_mb: float = 1024.0, progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None) -> tuple[np.ndarray, np.ndarray | None, EngineTimings]:
    """Score every slice. Returns raw scores [Z, H, W], the reconstruction in window units or None, and timings."""
    spec = detector.spec
    per_slice = float(detector.card.get("memory_per_slice_mb", DEFAULT_SLICE_MEMORY_MB))
    batch = batch_size_for(spec, memory_budget_mb, per_slice)
    if device.type == "cpu" and detector.cpu_batch_slices:
        batch = min(batch, detector.cpu_batch_slices)
    image = slices.windowed(spec)
    region = torch.from_numpy(slices.region)
    z = image.shape[0]
    scores = np.zeros(image.shape, np.float32)
    recon = None
    timings = EngineTimings(batch_size=batch, device=str(device), slices=z, slice_spacing_mm=slices.spacing_mm[0])
    detector.to(device)
    detector.slice_spacing_mm = float(slices.spacing_mm[0])
    for start in range(0, z, batch):
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user; nothing was written")
        stop = min(z, start + batch)
        t0 = time.perf_counter()
        out = score_batch(detector, with_context(image, range(start, stop), spec.context_slices),
                          region[start:stop], device, mixed_precision=detector.mixed_precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.network_s += time.perf_counter() - t0
        timings.batches += 1
        scores[start:stop] = out.score[:, 0].float().cpu().numpy()
        if out.slice_score is not None:
            if timings.slice_scores is None:
                timings.slice_scores = np.zeros(z, np.float32)
            timings.slice_scores[start:stop] = out.slice_score.float().cpu().numpy()
        if out.reconstruction is not None:
            if recon is None:
                recon = np.zeros(image.shape, np.float32)
            recon[start:stop] = out.reconstruction[:, 0].float().cpu().numpy()
        if progress is not None:
            progress("network", stop / z)
    return scores, recon, timings


def smooth_scores(scores: np.ndarray, region: np.ndarray, spacing_mm, sigma_mm: float) -> np.ndarray:
    """Normalized 3D Gaussian smoothing inside the region (sigma in mm on every axis); zero outside it."""
    if sigma_mm <= 0:
        return scores * region
    out = np.zeros_like(scores)
    box = ndi.find_objects(region.view(np.uint8) if region.dtype == bool else region.astype(np.uint8))
    if not box:
        return out
    # on the region's bounding box only: everything outside it is zero in both filtered arrays, as the zero padding
    # of mode "constant" is, so the values inside are the same as on the whole grid
    box = box[0]
    inside, scores = region[box], scores[box]
    sigma = [sigma_mm / s for s in spacing_mm]
    weight = inside.astype(np.float32)
    num = ndi.gaussian_filter(scores * weight, sigma, mode="constant", truncate=3.0)
    den = ndi.gaussian_filter(weight, sigma, mode="constant", truncate=3.0)
    np.divide(num, den, out=out[box], where=inside & (den > 1e-6))
    return out


LINE_ANGLES = 8  # orientations of the in-plane line means (22.5 degrees apart)


def line_kernels(spacing_yx, sigma_mm: float, angles: int = LINE_ANGLES) -> torch.Tensor:
    """[angles, 1, k, k] in-plane kernels, each a Gaussian of `sigma_mm` along one direction (truncated at 2 sigma)
    and about one pixel wide across it, on a grid of the given pixel spacing; each sums to 1."""
    sy, sx = (float(v) for v in spacing_yx)
    half = int(np.ceil(2 * sigma_mm / min(sy, sx)))
    dy, dx = np.meshgrid(np.arange(-half, half + 1) * sy, np.arange(-half, half + 1) * sx, indexing="ij")
    across_sigma = 0.5 * min(sy, sx)
    kernels = []
    for theta in np.arange(angles) * np.pi / angles:
        along = dx * np.cos(theta) + dy * np.sin(theta)
        across = -dx * np.sin(theta) + dy * np.cos(theta)
        k = np.exp(-0.5 * (along / sigma_mm) ** 2 - 0.5 * (across / across_sigma) ** 2) * (np.abs(along) <= 2 * sigma_mm)
        kernels.append(k / k.sum())
    return torch.from_numpy(np.stack(kernels)[:, None].astype(np.float32))


def line_scores(scores: np.ndarray, region: np.ndarray, spacing_mm, sigma_mm: float, chunk: int = 16) -> np.ndarray:
    """The best in-plane line mean at every voxel: for each of LINE_ANGLES directions the normalized mean of the
    scores inside the region along a line (Gaussian of sigma_mm), and the maximum over directions. A thin straight
    structure (a needle) keeps its value, where isotropic smoothing spreads it over its surroundings; isolated
    speckle is averaged away. Lines that are mostly outside the region (den < 0.5) do not count."""
    kernels = line_kernels(spacing_mm[1:], sigma_mm)
    pad = kernels.shape[-1] // 2
    out = np.zeros_like(scores, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, scores.shape[0], chunk):
            weight = torch.from_numpy(np.ascontiguousarray(region[start:start + chunk], np.float32))[:, None]
            values = torch.from_numpy(np.ascontiguousarray(scores[start:start + chunk], np.float32))[:, None]
            num = F.conv2d(values * weight, kernels, padding=pad)
            den = F.conv2d(weight, kernels, padding=pad)
            mean = torch.where(den > 0.5, num / den.clamp_min(1e-6), torch.zeros_like(num))
            out[start:start + chunk] = (mean.amax(1) * weight[:, 0]).numpy()
    return out


def score_slices(detector: Detector, slices: ModelSlices, **kwargs) -> tuple[np.ndarray, np.ndarray | None,
                                                                            EngineTimings]:
    """Run the detector and smooth: the raw map that calibration and detection both see. With the card's line_mm,
    the larger of the 3D-smoothed map and the best in-plane line mean (see line_scores)."""
    raw, recon, timings = run_detector(detector, slices, **kwargs)
    smoothed = smooth_scores(raw, slices.region, slices.spacing_mm, detector.spec.smoothing_mm)
    if detector.spec.line_mm > 0:
        np.maximum(smoothed, line_scores(raw, slices.region, slices.spacing_mm, detector.spec.line_mm), out=smoothed)
    return smoothed, recon, timings


def to_native(maps: np.ndarray, slices: ModelSlices) -> np.ndarray:
    """[Z, size, size] model-grid map -> [Z, P, L] canonical native grid, float32."""
    return slices.grid.to_native(torch.from_numpy(np.ascontiguousarray(maps, np.float32))).numpy()
