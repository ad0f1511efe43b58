"""'Training' of the 3D shape outlier: a high quantile of normal blobness per tissue class over normal training
slices (no gradient steps)."""

from __future__ import annotations

import numpy as np
import torch

from ..detectors.shape_outlier import DEFAULT_ARCHITECTURE
from .data import SliceBuffer

MAX_VALUES = 8_000_000  # blobness values kept over all classes (a uniform random subset of the body's pixels)
MIN_CLASS_VALUES = 2000  # fewer normal pixels than this in a class: it takes the largest scale of the others
MIN_SCALE = 5.0  # blobness units (HU): the scale of a class is never smaller


def architecture(overrides: dict) -> dict:
    return {**DEFAULT_ARCHITECTURE, **overrides}


@torch.no_grad()
def fit(detector, buffer: SliceBuffer, batch: int = 16) -> dict:
    """The `quantile` of blobness inside the body in each tissue class; every slice at its own volume's slice
    spacing."""
    spacing = buffer.slice_spacing_mm()
    keep = min(1.0, MAX_VALUES / max(1.0, float(buffer.regions.sum())))
    generator = torch.Generator().manual_seed(0)
    values = [[] for _ in range(len(detector.class_scale))]
    device = detector.class_scale.device
    for start in range(0, len(buffer), batch):
        stop = min(len(buffer), start + batch)
        for mm in np.unique(spacing[start:stop]):  # slices of one spacing at a time
            rows = torch.from_numpy(np.nonzero(spacing[start:stop] == mm)[0] + start)
            classes, blob = detector.features(buffer.images[rows].to(device), float(mm))
            inside = buffer.regions[rows].bool().to(device)
            if keep < 1.0:
                inside &= (torch.rand(inside.shape, generator=generator) < keep).to(device)
            for c in range(len(values)):
                values[c].append(blob[inside & (classes == c)].cpu())
    counts, scales = [], []
    for chunks in values:
        v = torch.cat(chunks).numpy()
        counts.append(int(v.size))
        scales.append(max(float(np.quantile(v, detector.quantile)), MIN_SCALE) if v.size >= MIN_CLASS_VALUES
                      else None)
    seen = [s for s in scales if s is not None]
    fallback = max(seen) if seen else MIN_SCALE
    for c, s in enumerate(scales):  # a class never seen in normal tissue: the most tolerant scale of any seen class
        detector.class_scale[c] = s if s is not None else fallback
    return {"class_voxels": counts, "class_scale": [round(float(v), 2) for v in detector.class_scale],
            "sampled_fraction": round(keep, 4)}


def memory_per_slice_mb() -> float:
    return 4.0
