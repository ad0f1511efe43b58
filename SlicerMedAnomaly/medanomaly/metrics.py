"""Metrics of the anomaly lab, computed the way published work does; each one is checked against scikit-learn.

Voxel metrics are pooled over every voxel of every case (MOOD's protocol) through score histograms, so memory stays
bounded whatever the number of cases; within one bin, voxels count as tied scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.stats import binomtest, rankdata

from .findings import CONNECTIVITY


def _ranked(scores, labels):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    return scores, labels


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    scores, labels = _ranked(scores, labels)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def proportion_interval(found: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion found/total (scipy's binomtest); (nan, nan) without trials."""
    if total == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(found), int(total)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def auroc_interval(scores, labels, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `roc_auc`, the positive and the negative cases resampled separately (each
    class keeps its size); (nan, nan) without both classes. Resampled here rather than by scipy's `bootstrap`,
    which refuses a class of one case (a lab with one normal slab)."""
    scores, labels = _ranked(scores, labels)
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 24) // (len(positive) * len(negative)))  # resamples per pass: bounded memory
    values = []
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        p = positive[rng.integers(0, len(positive), (m, len(positive)))][:, :, None]
        n = negative[rng.integers(0, len(negative), (m, len(negative)))][:, None, :]
        values.append(((p > n) + 0.5 * (p == n)).mean(axis=(1, 2)))  # Mann-Whitney, ties half
    low, high = np.quantile(np.concatenate(values), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def average_precision(scores, labels) -> float:
    """Average precision as scikit-learn defines it: sum over thresholds of (R_n - R_{n-1}) * P_n, ties grouped."""
    scores, labels = _ranked(scores, labels)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class PooledVoxelCurve:
    """Positive and negative voxel counts per score bin, accumulated over cases.

    Scores are significance, u = -log10(1 - p) of calibrated probabilities p (what detection thresholds), binned
    on [0, max_u) with `bins` bins: that resolves both the bulk and the far tail, which a float32 probability
    rounds to 1 above 1 - 6e-8.
    """

    def __init__(self, bins: int = 1 << 18, max_u: float = 20.0):
        self.bins, self.max_u = bins, max_u
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def bin_of(self, significance: np.ndarray) -> np.ndarray:
        u = np.clip(np.asarray(significance, dtype=np.float64), 0.0, self.max_u)
        return np.minimum((u / self.max_u * self.bins).astype(np.int64), self.bins - 1)

    def add(self, significance: np.ndarray, labels: np.ndarray) -> None:
        b = self.bin_of(significance.ravel())
        y = np.asarray(labels).ravel().astype(bool)
        self.pos += np.bincount(b[y], minlength=self.bins)
        self.neg += np.bincount(b[~y], minlength=self.bins)

    def _cumulative(self):
        tp = np.cumsum(self.pos[::-1])  # thresholds from the highest bin down
        fp = np.cumsum(self.neg[::-1])
        keep = (self.pos[::-1] + self.neg[::-1]) > 0
        return tp[keep], fp[keep]

    def average_precision(self) -> float:
        tp, fp = self._cumulative()
        if tp.size == 0 or tp[-1] == 0:
            return float("nan")
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / tp[-1]
        return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))

    def auroc(self) -> float:
        tp, fp = self._cumulative()
        if tp.size == 0 or tp[-1] == 0 or fp[-1] == 0:
            return float("nan")
        tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))

    def best_dice(self) -> tuple[float, float]:
        """Strict Dice (no dilation of the ground truth) at the best threshold, and that threshold (a probability)."""
        tp = np.cumsum(self.pos[::-1])
        fp = np.cumsum(self.neg[::-1])
        total = self.pos.sum()
        if total == 0:
            return float("nan"), float("nan")
        dice = 2 * tp / np.maximum(2 * tp + fp + (total - tp), 1)
        best = int(np.argmax(dice))
        threshold_bin = self.bins - 1 - best
        return float(dice[best]), float(1.0 - 10.0 ** (-threshold_bin * self.max_u / self.bins))


def _match_components(components: np.ndarray, n: int, values: np.ndarray, lesion_labels: np.ndarray | None,
                      min_voxels: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """For labelled components (1..n) of a score map: which have at least `min_voxels` voxels, each one's peak score,
    and the (component, lesion) pairs where the component hits the lesion (its peak voxel lies in the lesion, or at
    least a quarter of it does; only components of the minimum size)."""
    idx = np.flatnonzero(components)
    comp = components.ravel()[idx]
    sizes = np.bincount(comp, minlength=n + 1)
    score = values.ravel()[idx]
    peak = np.zeros(n + 1)
    np.maximum.at(peak, comp, score)
    valid = sizes >= min_voxels
    valid[0] = False
    hits = []
    if lesion_labels is not None:
        lab = lesion_labels.ravel()[idx]
        order = np.lexsort((score, comp))  # within each component, its peak voxel comes last
        last = np.r_[np.nonzero(np.diff(comp[order]))[0], order.size - 1]
        peak_label = np.zeros(n + 1, np.int64)
        peak_label[comp[order[last]]] = lab[order[last]]
        inside = lab > 0
        if inside.any():
            pairs, overlap = np.unique(np.stack([comp[inside], lab[inside]], 1), axis=0, return_counts=True)
            hits = [(int(c), int(lesion)) for (c, lesion), count in zip(pairs, overlap)
                    if valid[c] and (peak_label[c] == lesion or count >= 0.25 * sizes[c])]
    return valid, peak, hits


@dataclass
class FROC:
    """Lesion-level FROC from scored candidates (components of the heatmap above a low base threshold, scored by
    their peak). A candidate hits a lesion when its peak voxel lies in the lesion or at least a quarter of the
    candidate lies in it, so one sprawling candidate cannot claim every lesion; a candidate that hits no lesion is a
    false positive."""

    n_volumes: int = 0
    lesions: list[dict] = field(default_factory=list)  # {"case", "label", "best": best overlapping score, ...}
    false_positive_scores: list[float] = field(default_factory=list)

    def add_case(self, heatmap: np.ndarray, lesion_labels: np.ndarray | None, base_threshold: float,
                 min_voxels: int, lesion_info: dict[int, dict] | None = None, case: str = "") -> None:
        self.n_volumes += 1
        components, n = ndi.label(heatmap >= base_threshold, structure=CONNECTIVITY)
        best = {}
        if n:
            valid, peak, hits = _match_components(components, n, heatmap, lesion_labels, min_voxels)
            hits_any = np.zeros(n + 1, bool)
            for c, lesion in hits:
                hits_any[c] = True
                best[lesion] = max(best.get(lesion, -1.0), float(peak[c]))
            self.false_positive_scores.extend(float(peak[c]) for c in np.nonzero(valid & ~hits_any)[0])
        if lesion_labels is not None:
            for lesion in np.unique(lesion_labels[lesion_labels > 0]):
                info = (lesion_info or {}).get(int(lesion), {})
                self.lesions.append({"case": case, "label": int(lesion), "best": best.get(int(lesion), -1.0), **info})

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds, false positives per volume, sensitivity) over every candidate score."""
        fps = np.sort(np.asarray(self.false_positive_scores))[::-1]
        bests = np.asarray([lesion["best"] for lesion in self.lesions])
        thresholds = np.unique(np.r_[fps, bests[bests >= 0], np.inf])[::-1]
        fp_rate = np.array([(fps >= t).sum() for t in thresholds]) / max(self.n_volumes, 1)
        sens = np.array([(bests >= t).sum() for t in thresholds]) / max(len(bests), 1)
        return thresholds, fp_rate, sens

    def threshold_at(self, fp_per_volume: float) -> float:
        """The lowest candidate score with no more than `fp_per_volume` false positives per volume at or above it."""
        thresholds, fp_rate, _ = self.curve()
        ok = thresholds[fp_rate <= fp_per_volume]
        return float(ok.min()) if ok.size else float("inf")

    def lesion_table(self, fp_per_volume: float) -> dict:
        """Each lesion with its best candidate score and whether it is found at `fp_per_volume`: which lesions a
        sensitivity counts, for diagnosing misses without scoring again."""
        t = self.threshold_at(fp_per_volume)
        return {"fp_per_volume": fp_per_volume, "threshold": t if np.isfinite(t) else None,
                "lesions": [dict(lesion, best=round(float(lesion["best"]), 6), found=bool(lesion["best"] >= t))
                            for lesion in self.lesions]}

    def sensitivity_at(self, fp_per_volume: float, subset=None) -> float:
        """Highest sensitivity (over `subset` of lesions if given) at no more than `fp_per_volume`."""
        t = self.threshold_at(fp_per_volume)
        lesions = [lesion for lesion in self.lesions if subset is None or subset(lesion)]
        if not lesions:
            return float("nan")
        return float(np.mean([lesion["best"] >= t for lesion in lesions]))


FINDING_LEVELS = np.unique(np.r_[np.arange(1.0, 15.0, 0.05), np.arange(15.0, 301.0, 1.0)])


@dataclass
class FindingsFROC:
    """Lesion-level FROC of the findings detect reports. At each significance level (FINDING_LEVELS, -log10(1 - p))
    the findings are the 26-connected components of at least the minimum size, as detect thresholds them; a finding
    hits a lesion by FROC's rule (its peak in the lesion, or a quarter of it), and one that hits none is a false
    finding. The sensitivity at a rate of false findings per volume is the best over the levels that stay within it.
    Unlike FROC's candidates, which come from one low level, a component that merges a lesion with normal tissue
    there is judged again at every level where they have come apart."""

    levels: np.ndarray = field(default_factory=lambda: FINDING_LEVELS.copy())
    n_volumes: int = 0
    false_findings: np.ndarray | None = None  # per level, summed over volumes
    lesions: list[dict] = field(default_factory=list)  # {"case", "label", "hit": bool per level, ...}

    def __post_init__(self):
        if self.false_findings is None:
            self.false_findings = np.zeros(len(self.levels), np.int64)

    def add_case(self, significance: np.ndarray, lesion_labels: np.ndarray | None, min_voxels: int,
                 lesion_info: dict[int, dict] | None = None, case: str = "") -> None:
        self.n_volumes += 1
        ids = [int(v) for v in np.unique(lesion_labels[lesion_labels > 0])] if lesion_labels is not None else []
        hit = {lesion: np.zeros(len(self.levels), bool) for lesion in ids}
        box = tuple(slice(0, n) for n in significance.shape)
        for i, level in enumerate(self.levels):
            mask = significance[box] >= level
            if not mask.any():
                break  # no finding at this level or above
            (inner,) = ndi.find_objects(mask.astype(np.uint8))  # the levels only rise: crop to what is left
            box = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, inner))
            components, n = ndi.label(mask[inner], structure=CONNECTIVITY)
            valid, _, pairs = _match_components(components, n, significance[box],
                                                None if lesion_labels is None else lesion_labels[box], min_voxels)
            hitting = {c for c, _ in pairs}
            self.false_findings[i] += int(sum(1 for c in np.nonzero(valid)[0] if c not in hitting))
            for _, lesion in pairs:
                hit[lesion][i] = True
        for lesion in ids:
            info = (lesion_info or {}).get(lesion, {})
            self.lesions.append({"case": case, "label": lesion, "hit": hit[lesion], **info})

    def sensitivity_at(self, fp_per_volume: float, subset=None) -> float:
        """Highest sensitivity (over `subset` of lesions if given) at a level with no more than `fp_per_volume`
        false findings per volume."""
        lesions = [lesion for lesion in self.lesions if subset is None or subset(lesion)]
        if not lesions:
            return float("nan")
        within = self.false_findings / max(self.n_volumes, 1) <= fp_per_volume
        if not within.any():
            return 0.0
        return float(np.mean([lesion["hit"] for lesion in lesions], axis=0)[within].max())


def localization_hits(heatmap_slices: np.ndarray, lesion_slices: np.ndarray, patch: int = 32) -> np.ndarray:
    """For each axial slice [Z, H, W] with lesion voxels: does the highest-scoring `patch` x `patch` window (mean
    score, stride 1, native spacing) overlap the lesion? The StyleGAN2 CT study's localization criterion."""
    heat = torch.from_numpy(np.ascontiguousarray(heatmap_slices, np.float32))[:, None]
    lesion = torch.from_numpy(np.ascontiguousarray(lesion_slices, np.float32))[:, None]
    k = min(patch, heat.shape[-1], heat.shape[-2])
    mean = F.avg_pool2d(heat, k, stride=1)
    overlap = F.avg_pool2d(lesion, k, stride=1) > 0
    flat = mean.flatten(1).argmax(1)
    return overlap.flatten(1)[torch.arange(len(flat)), flat].numpy()
