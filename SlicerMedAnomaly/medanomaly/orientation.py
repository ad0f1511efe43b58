"""Canonical axial orientation: models always see slices as [superior, posterior, left] arrays, the same way up.

Only axis permutations and flips are used (no resampling), so results map back to the input grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Reorientation:
    """Maps a [k, j, i] array of an image to canonical [S, P, L] order and back (views, never copies)."""

    axes: tuple[int, int, int]  # canonical axis b takes input array axis axes[b]
    flips: tuple[bool, bool, bool]  # whether canonical axis b runs against its physical direction
    canonical_spacing: tuple[float, float, float]  # mm along canonical axes (S, P, L)

    @classmethod
    def from_geometry(cls, direction, spacing) -> "Reorientation":
        """direction: 3x3 (row-major, as SimpleITK gives it) of image axes i, j, k in LPS; spacing: (i, j, k) mm."""
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        # Pair every image axis with the physical axis it is closest to; an assignment keeps oblique 45-degree
        # cases a permutation.
        image_axes, physical_axes = linear_sum_assignment(-np.abs(d.T))
        physical_of = dict(zip(image_axes, physical_axes))
        axes, flips, cspacing = [], [], []
        for b in range(3):  # canonical axis b is physical axis 2-b (S, P, L)
            image_axis = next(c for c, p in physical_of.items() if p == 2 - b)
            axes.append(2 - image_axis)  # array axis of image axis c is 2-c
            flips.append(bool(d[2 - b, image_axis] < 0))
            cspacing.append(float(spacing[image_axis]))
        return cls(tuple(axes), tuple(flips), tuple(cspacing))

    @classmethod
    def for_image(cls, image) -> "Reorientation":
        return cls.from_geometry(image.GetDirection(), image.GetSpacing())

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        flip_axes = tuple(b for b in range(3) if self.flips[b])
        return np.flip(out, flip_axes) if flip_axes else out

    def to_input(self, array: np.ndarray) -> np.ndarray:
        flip_axes = tuple(b for b in range(3) if self.flips[b])
        out = np.flip(array, flip_axes) if flip_axes else array
        return np.transpose(out, np.argsort(self.axes))

    def canonical_index(self, input_index_kji, canonical_shape) -> np.ndarray:
        """Canonical [S, P, L] index of an input array index [k, j, i] (fractional values allowed)."""
        kji = np.asarray(input_index_kji, dtype=float)
        out = np.array([kji[self.axes[b]] for b in range(3)])
        for b in range(3):
            if self.flips[b]:
                out[b] = canonical_shape[b] - 1 - out[b]
        return out

    def input_index(self, canonical_index, canonical_shape) -> np.ndarray:
        """Input array index [k, j, i] of a canonical [S, P, L] index (inverse of canonical_index)."""
        c = np.asarray(canonical_index, dtype=float)
        unflipped = [canonical_shape[b] - 1 - c[b] if self.flips[b] else c[b] for b in range(3)]
        out = np.empty(3)
        for b in range(3):
            out[self.axes[b]] = unflipped[b]
        return out
