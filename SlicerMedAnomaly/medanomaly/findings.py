"""Findings: 3D connected components of the thresholded heatmap on the input grid, measured and ranked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:  # only annotations: the training package imports this module and never reads images
    import SimpleITK as sitk

MAX_FINDINGS = 255  # labels.nrrd stays uint8; weaker components beyond this are dropped and counted
CONNECTIVITY = np.ones((3, 3, 3), bool)  # a finding is a 26-connected component (calibration and metrics count alike)


def find_findings(heatmap: np.ndarray, hu: np.ndarray, image: sitk.Image, threshold: float,
                  min_size_mm3: float) -> tuple[np.ndarray, list[dict], int]:
    """Threshold `heatmap` ([k, j, i] on `image`'s grid), keep 26-connected components of at least `min_size_mm3`,
    rank them by peak probability (then volume), and measure each one.

    Returns the label map (finding i has label i), the findings and the number of components dropped beyond
    MAX_FINDINGS.
    """
    spacing = np.asarray(image.GetSpacing())
    voxel_mm3 = float(np.prod(spacing))
    labels, n = ndi.label(heatmap >= threshold, structure=CONNECTIVITY)
    flat_idx = np.flatnonzero(labels)
    if n == 0 or flat_idx.size == 0:
        return np.zeros(heatmap.shape, np.uint8), [], 0
    lab = labels.ravel()[flat_idx]
    del labels
    counts = np.bincount(lab, minlength=n + 1)
    prob = heatmap.ravel()[flat_idx]
    peak = np.zeros(n + 1)
    np.maximum.at(peak, lab, prob)
    keep = np.nonzero(counts * voxel_mm3 >= min_size_mm3)[0]
    keep = keep[keep > 0]
    order = keep[np.lexsort((-counts[keep], -peak[keep]))]
    dropped = max(0, order.size - MAX_FINDINGS)
    order = order[:MAX_FINDINGS]
    rank = np.zeros(n + 1, np.int64)
    rank[order] = np.arange(1, order.size + 1)
    new = rank[lab]
    sel = new > 0
    flat_idx, new, prob = flat_idx[sel], new[sel], prob[sel]
    out = np.zeros(heatmap.size, np.uint8)
    out[flat_idx] = new
    out = out.reshape(heatmap.shape)
    m = order.size + 1
    count = np.bincount(new, minlength=m).astype(np.float64)
    hu_sum = np.bincount(new, weights=hu.ravel()[flat_idx].astype(np.float64), minlength=m)
    prob_sum = np.bincount(new, weights=prob, minlength=m)
    coords = np.unravel_index(flat_idx, heatmap.shape)  # k, j, i
    centroid = [np.bincount(new, weights=c, minlength=m) / np.maximum(count, 1) for c in coords]
    findings = []
    for i, box in enumerate(ndi.find_objects(out, max_label=order.size), start=1):
        k0, j0, i0 = (s.start for s in box)
        k1, j1, i1 = (s.stop - 1 for s in box)
        cidx = (float(centroid[2][i]), float(centroid[1][i]), float(centroid[0][i]))
        lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(cidx))
        findings.append({
            "id": i,
            "label": i,
            "name": f"Anomaly {i}",
            "centroid_ijk": [round(v, 2) for v in cidx],
            "centroid_lps_mm": [round(float(v), 2) for v in lps],
            "centroid_ras_mm": [round(float(v), 2) for v in lps * np.array([-1.0, -1.0, 1.0])],
            "bbox_ijk": {"min": [int(i0), int(j0), int(k0)], "max": [int(i1), int(j1), int(k1)]},
            "slice_range_k": [int(k0), int(k1)],
            "volume_mm3": round(float(count[i] * voxel_mm3), 2),
            "voxels": int(count[i]),
            "max_probability": round(float(peak[order[i - 1]]), 6),
            "mean_probability": round(float(prob_sum[i] / count[i]), 6),
            "mean_hu": round(float(hu_sum[i] / count[i]), 1),
        })
    return out, findings, dropped
