"""Findings: 3D connected components of the thresholded heatmap on the input grid, measured and ranked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from .significance import poisson_p_value, probability_of_significance

if TYPE_CHECKING:  # only annotations: the training package imports this module and never reads images
    import SimpleITK as sitk

MAX_FINDINGS = 255  # labels.nrrd stays uint8; weaker components beyond this are dropped and counted
CONNECTIVITY = np.ones((3, 3, 3), bool)  # a finding is a 26-connected component (calibration and metrics count alike)


def min_voxels_for(min_size_mm3: float, voxel_mm3: float) -> int:
    """The fewest voxels of this size that make a finding of at least `min_size_mm3` (at least 1)."""
    return max(1, int(np.ceil(min_size_mm3 / float(voxel_mm3))))


def count_components(mask: np.ndarray, min_voxels: int) -> int:
    labels, n = ndi.label(mask, structure=CONNECTIVITY)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= min_voxels).sum())


def strongest_component_level(scores: np.ndarray, region: np.ndarray, min_voxels: int, floor: float) -> float:
    """The highest score level s at which {scores >= s} inside the region still holds a 26-connected component of at
    least `min_voxels` voxels (`floor` when there is none even there).

    Exact: s is one of the scores' values. A component above any level lies inside one component of {scores >=
    floor}, so each of those (of at least `min_voxels` voxels, highest peak first) is searched on its own bounding box
    by bisection over its values, and one whose peak does not beat the best level so far is skipped.
    """
    labels, n = ndi.label(region & (scores >= floor), structure=CONNECTIVITY)
    if n == 0:
        return float(floor)
    inside = labels > 0
    found = labels[inside] - 1
    sizes = np.bincount(found, minlength=n)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, found, scores[inside])  # (ndi.maximum with an index takes seconds on a volume)
    boxes = ndi.find_objects(labels)
    best = float(floor)
    for i in np.argsort(-peaks, kind="stable"):
        if peaks[i] <= best:
            break  # sorted by peak: no later component can beat it
        if sizes[i] < min_voxels:
            continue
        box = boxes[i]
        component = np.where(labels[box] == i + 1, scores[box], -np.inf)
        levels = np.unique(component[component > best])  # ascending; the answer is one of them or best itself
        holds = lambda level: count_components(component >= level, min_voxels) > 0  # noqa: E731
        if not holds(levels[0]):
            continue
        lo, hi = 0, len(levels) - 1  # holds(levels[lo]) is true; find the last level that holds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if holds(levels[mid]):
                lo = mid
            else:
                hi = mid - 1
        best = float(levels[lo])
    return best


def strongest_finding_p_value(significance: np.ndarray, curve, extent_cm: float, min_voxels: int,
                              floor_fp_per_volume: float = 50.0) -> float:
    """P(a normal volume of this length has a finding at least as strong as the strongest of this significance
    map), under `curve`'s calibrated false-finding rate (a FalseFindingCurve; Poisson model): the p-value the
    strongest finding find_findings reports would carry, at every threshold that keeps it. A map with no component
    of `min_voxels` above the level at which normal CT makes `floor_fp_per_volume` findings gets that level's
    p-value (1 to float precision)."""
    floor = curve.threshold_significance(floor_fp_per_volume, extent_cm)
    level = strongest_component_level(significance, significance >= floor, min_voxels, floor)
    return poisson_p_value(curve.log_expected_findings(level, extent_cm))


def find_findings(significance: np.ndarray, hu: np.ndarray, image: sitk.Image, threshold: float,
                  min_size_mm3: float, log_expected=None, members: list[str] | None = None,
                  source: np.ndarray | None = None) -> tuple[np.ndarray, list[dict], int]:
    """Threshold the heatmap's `significance` (-log10(1 - probability), [k, j, i] on `image`'s grid) at
    `threshold` (the same units), keep 26-connected components of at least `min_size_mm3`, and measure each one.

    A finding's strength is the highest significance at which it still holds a component of the minimum size: the
    level at which calibration counts a normal finding as strong. Findings are ranked by it (then by peak and
    volume). `log_expected(strength)`, when given, is the log of the number of normal findings at least as strong
    expected in a normal volume of this length; each finding then carries it and its p-value.

    `members`: the model's name, or an ensemble's member names with `source` (per voxel, the index of the member with
    the highest significance there). Each finding then names the one that flagged it, `flagged_by`: the member at
    its peak voxel; an ensemble's findings also carry `member_shares`, the share of their voxels where each member
    is highest.

    Returns the label map (finding i has label i), the findings and the number of components dropped beyond
    MAX_FINDINGS.
    """
    spacing = np.asarray(image.GetSpacing())
    voxel_mm3 = float(np.prod(spacing))
    min_voxels = min_voxels_for(min_size_mm3, voxel_mm3)
    labels, n = ndi.label(significance >= threshold, structure=CONNECTIVITY)
    flat_idx = np.flatnonzero(labels)
    if n == 0 or flat_idx.size == 0:
        return np.zeros(significance.shape, np.uint8), [], 0
    lab = labels.ravel()[flat_idx]
    counts = np.bincount(lab, minlength=n + 1)
    sig = significance.ravel()[flat_idx]
    peak = np.zeros(n + 1)
    np.maximum.at(peak, lab, sig)
    keep = np.nonzero(counts >= min_voxels)[0]
    keep = keep[keep > 0]
    boxes = ndi.find_objects(labels)
    strength = np.zeros(n + 1)
    for c in keep:
        box = boxes[c - 1]
        inside = labels[box] == c
        strength[c] = strongest_component_level(significance[box], inside, min_voxels, float(threshold))
    del labels
    order = keep[np.lexsort((-counts[keep], -peak[keep], -strength[keep]))]
    dropped = max(0, order.size - MAX_FINDINGS)
    order = order[:MAX_FINDINGS]
    rank = np.zeros(n + 1, np.int64)
    rank[order] = np.arange(1, order.size + 1)
    new = rank[lab]
    sel = new > 0
    flat_idx, new, sig = flat_idx[sel], new[sel], sig[sel]
    out = np.zeros(significance.size, np.uint8)
    out[flat_idx] = new
    out = out.reshape(significance.shape)
    m = order.size + 1
    count = np.bincount(new, minlength=m).astype(np.float64)
    hu_sum = np.bincount(new, weights=hu.ravel()[flat_idx].astype(np.float64), minlength=m)
    prob_sum = np.bincount(new, weights=probability_of_significance(sig, np.float64), minlength=m)
    coords = np.unravel_index(flat_idx, significance.shape)  # k, j, i
    if source is not None and new.size:  # (no finding of the minimum size: nothing to attribute)
        member = source.ravel()[flat_idx]  # per finding voxel
        by_peak = np.lexsort((sig, new))  # by finding, then by significance: each finding's peak voxel comes last
        peak_member = member[by_peak[np.r_[np.nonzero(np.diff(new[by_peak]))[0], new.size - 1]]]
        shares = np.bincount(new * len(members) + member,
                             minlength=m * len(members)).reshape(m, len(members)) / np.maximum(count, 1)[:, None]
    centroid = [np.bincount(new, weights=c, minlength=m) / np.maximum(count, 1) for c in coords]
    findings = []
    for i, box in enumerate(ndi.find_objects(out, max_label=order.size), start=1):
        k0, j0, i0 = (s.start for s in box)
        k1, j1, i1 = (s.stop - 1 for s in box)
        cidx = (float(centroid[2][i]), float(centroid[1][i]), float(centroid[0][i]))
        lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(cidx))
        c = order[i - 1]
        finding = {
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
            "max_probability": round(float(probability_of_significance(peak[c], np.float64)), 6),
            "mean_probability": round(float(prob_sum[i] / count[i]), 6),
            "mean_hu": round(float(hu_sum[i] / count[i]), 1),
            "peak_significance": round(float(peak[c]), 3),
            "significance": round(float(strength[c]), 3),
        }
        if members is not None:
            finding["flagged_by"] = members[int(peak_member[i - 1]) if source is not None else 0]
        if source is not None:
            finding["member_shares"] = {name: round(float(share), 3) for name, share in zip(members, shares[i])}
        if log_expected is not None:
            log_e = log_expected(float(strength[c]))
            finding["expected_normal_findings"] = float(f"{np.exp(log_e):.4g}")
            finding["p_value"] = float(f"{poisson_p_value(log_e):.4g}")
        findings.append(finding)
    return out, findings, dropped
