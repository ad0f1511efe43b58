"""'Training' of the HU-outlier baseline: robust statistics per tissue class over normal training slices."""

from __future__ import annotations

import torch

from ..detectors.hu_outlier import DEFAULT_ARCHITECTURE
from .data import SliceBuffer


def architecture(overrides: dict) -> dict:
    return {**DEFAULT_ARCHITECTURE, **overrides}


@torch.no_grad()
def fit(detector, buffer: SliceBuffer) -> dict:
    """Median and MAD (scaled to a standard deviation) of the narrow local mean in each class, inside the body."""
    values = [[] for _ in range(len(detector.class_median))]
    for start in range(0, len(buffer), 64):
        classes, value = detector.features(buffer.images[start:start + 64])
        inside = buffer.regions[start:start + 64].bool()
        for c in range(len(values)):
            values[c].append(value[inside & (classes == c)])
    counts = []
    for c, chunks in enumerate(values):
        v = torch.cat(chunks)
        counts.append(int(v.numel()))
        if v.numel() >= 50:
            median = v.median()
            detector.class_median[c] = median
            detector.class_mad[c] = max(1.4826 * float((v - median).abs().median()), 5.0)
        else:  # a class never seen in normal tissue: centre it on its own range, with a wide spread
            lo, hi = float(detector.class_edges[c]), float(detector.class_edges[c + 1])
            detector.class_median[c] = (lo + hi) / 2
            detector.class_mad[c] = max((hi - lo) / 2, 50.0)
    return {"class_voxels": counts, "class_median_hu": [round(float(v), 1) for v in detector.class_median],
            "class_mad_hu": [round(float(v), 1) for v in detector.class_mad]}


def memory_per_slice_mb() -> float:
    return 4.0
