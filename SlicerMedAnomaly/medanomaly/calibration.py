"""Calibration of raw scores against held-out normal CT, stored in the model card.

- Voxel probability: the fraction of normal reference voxels that score lower (an empirical CDF), so a normal voxel
  is uniform on [0, 1] and 0.999 means "higher than 99.9% of normal tissue".
- False-positive curve: findings (components of at least the minimum size) per cm of normal CT at a grid of
  probability thresholds, extended past the last observed false positive by a power-law fit of its tail. A user's
  target of false positives per normal volume (or `sensitivity`) becomes a threshold for the volume at hand.
- Volume score: the probability that a normal volume of this length has no finding as strong as this volume's
  strongest, exp(-fp_rate(t*) * length), from the same curve (Poisson model of false findings).
- Slice scores (methods with an image-level score): an empirical CDF of normal slices' scores; the volume score is
  then the probability that none of a normal volume's slices scores as high as this volume's highest,
  exp(-n_slices * P(normal slice > max)), which neighbouring slices' correlation makes conservative.
- Reference check: the highest share of a reference slice's region at probability >= REFERENCE_LEVEL. A slice of a
  new scan with UNLIKE_FACTOR times that share or more does not look like the normal reference as a whole (another
  body region, contrast phase, reconstruction kernel or scanner, or widespread disease), which a focal finding does
  not explain; detect warns about such slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .findings import count_components, min_voxels_for, strongest_component_level  # noqa: F401
from .significance import LN10, FalseFindingCurve, poisson_p_value

VOXEL_LEVELS = np.unique(np.concatenate([np.linspace(0.0, 0.99, 100), 1.0 - np.logspace(-2, -6, 41)]))
FP_THRESHOLDS = 1.0 - np.logspace(-1, -6.5, 56)
TAIL_LEVEL = VOXEL_LEVELS[-1]
REFERENCE_LEVEL = 0.99  # the reference check counts each slice's region voxels at this probability or above
UNLIKE_FACTOR = 1.5  # a slice with this many times the highest share of any reference slice is unlike the reference
MIN_SLICE_REGION = 500  # slices with fewer region voxels (on the model grid) are not checked: their shares are noise


def sensitivity_to_fp_per_volume(sensitivity: float) -> float:
    """Sensitivity in [0, 1] as a target of false-positive findings per normal volume: 0 -> 0.01, 0.5 -> 0.32,
    1 -> 10 (log scale)."""
    if not 0.0 <= sensitivity <= 1.0:
        raise ValueError("sensitivity must lie in [0, 1]")
    return float(10.0 ** (3.0 * sensitivity - 2.0))


def fit_quantiles(values: np.ndarray, levels: np.ndarray = VOXEL_LEVELS,
                  tail_from: float = 0.99) -> tuple[np.ndarray, float]:
    """Quantiles of normal reference scores at `levels` (made strictly increasing, so that interpolation is a
    function) and the scale of the exponential tail: the mean excess over the `tail_from` quantile."""
    values = np.asarray(values, np.float64).ravel()
    quantiles = np.quantile(values, levels)
    quantiles = np.maximum.accumulate(quantiles) + np.arange(quantiles.size) * 1e-9
    start = float(np.quantile(values, tail_from))
    tail_scale = float(np.mean(values[values > start] - start)) if np.any(values > start) else 1e-6
    return quantiles, tail_scale


def tail_log_exceedance(scores, quantiles: np.ndarray, levels: np.ndarray, tail_scale: float) -> np.ndarray:
    """log(1 - CDF) of raw scores under the empirical CDF given by (quantiles, levels), exact far into the tail:
    above the highest quantile the exceedance decays exponentially with the fitted scale (peaks over threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    top = min(float(levels[-1]), TAIL_LEVEL)
    out = np.empty_like(scores)
    above = scores > quantiles[-1]
    out[above] = np.log1p(-top) - (scores[above] - quantiles[-1]) / max(tail_scale, 1e-12)
    p = np.minimum(np.interp(scores[~above], quantiles, levels), top)
    out[~above] = np.log(np.maximum(1.0 - p, 1e-300))
    return out


def contiguous_runs(indices: np.ndarray) -> list[np.ndarray]:
    """[3,4,5,9,10] -> [[3,4,5],[9,10]]"""
    if indices.size == 0:
        return []
    breaks = np.nonzero(np.diff(indices) != 1)[0] + 1
    return np.split(indices, breaks)


def exceedance_shares(probability: np.ndarray, region: np.ndarray, level: float = REFERENCE_LEVEL) -> np.ndarray:
    """Per slice of [Z, H, W] arrays: the share of region voxels at calibrated probability >= `level` (NaN for slices
    with fewer than MIN_SLICE_REGION region voxels)."""
    counted = region.reshape(region.shape[0], -1).sum(1)
    above = ((probability >= level) & region).reshape(region.shape[0], -1).sum(1)
    return np.where(counted >= MIN_SLICE_REGION, above / np.maximum(counted, 1), np.nan)


@dataclass
class Calibration(FalseFindingCurve):
    voxel_quantiles: np.ndarray  # raw score at each of voxel_levels on normal reference voxels
    voxel_levels: np.ndarray
    fp_thresholds: np.ndarray  # probability thresholds, increasing
    fp_per_cm: np.ndarray  # false-positive findings per cm of normal CT at each threshold
    fp_tail_slope: float  # d log(fp) / d log(1 - t) beyond the last observed false positive
    voxel_tail_scale: float  # mean excess of normal scores over their 99th percentile (exponential tail)
    default_fp_per_volume: float = 0.32
    min_size_mm3: float = 65.0
    slice_quantiles: np.ndarray | None = None  # raw slice score at each of voxel_levels on normal slices
    slice_tail_scale: float = 1e-6
    reference_share_max: float | None = None  # highest exceedance_shares of a reference slice (the reference check)

    @classmethod
    def from_card(cls, cal: dict) -> "Calibration":
        return cls(voxel_quantiles=np.asarray(cal["voxel_quantiles"], np.float64),
                   voxel_levels=np.asarray(cal["voxel_levels"], np.float64),
                   fp_thresholds=np.asarray(cal["fp_thresholds"], np.float64),
                   fp_per_cm=np.asarray(cal["fp_per_cm"], np.float64),
                   fp_tail_slope=float(cal["fp_tail_slope"]),
                   voxel_tail_scale=float(cal["voxel_tail_scale"]),
                   default_fp_per_volume=float(cal["default_fp_per_volume"]),
                   min_size_mm3=float(cal["min_size_mm3"]),
                   slice_quantiles=(np.asarray(cal["slice_quantiles"], np.float64) if cal.get("slice_quantiles")
                                    else None),
                   slice_tail_scale=float(cal.get("slice_tail_scale", 1e-6)),
                   reference_share_max=(float(cal["reference_share_max"]) if "reference_share_max" in cal
                                        else None))

    def to_card(self, **extra) -> dict:
        return {"voxel_quantiles": self.voxel_quantiles.tolist(), "voxel_levels": self.voxel_levels.tolist(),
                "fp_thresholds": self.fp_thresholds.tolist(), "fp_per_cm": self.fp_per_cm.tolist(),
                "fp_tail_slope": self.fp_tail_slope, "voxel_tail_scale": self.voxel_tail_scale,
                "default_fp_per_volume": self.default_fp_per_volume,
                "min_size_mm3": self.min_size_mm3,
                **({"slice_quantiles": self.slice_quantiles.tolist(), "slice_tail_scale": self.slice_tail_scale}
                   if self.slice_quantiles is not None else {}),
                **({"reference_share_max": self.reference_share_max} if self.reference_share_max is not None else {}),
                **extra}

    def log_exceedance(self, scores) -> np.ndarray:
        """log(1 - probability) of raw voxel scores (see tail_log_exceedance)."""
        return tail_log_exceedance(scores, self.voxel_quantiles, self.voxel_levels, self.voxel_tail_scale)

    def slice_log_exceedance(self, slice_scores) -> np.ndarray:
        """log(1 - probability) of raw slice scores under the normal slices' CDF (needs slice calibration)."""
        if self.slice_quantiles is None:
            raise ValueError("this calibration has no slice scores")
        return tail_log_exceedance(slice_scores, self.slice_quantiles, self.voxel_levels, self.slice_tail_scale)

    def unlike_reference(self, probability: np.ndarray, region: np.ndarray) -> np.ndarray | None:
        """Per slice: its exceedance share over the highest of any reference slice (NaN where not measured; None
        when the calibration predates the reference check). Slices at UNLIKE_FACTOR or more are unlike the
        reference."""
        if self.reference_share_max is None:
            return None
        return exceedance_shares(probability, region) / max(self.reference_share_max, 1e-6)

    def voxel_significance(self, scores, region: np.ndarray | None = None) -> np.ndarray:
        """Raw (smoothed) scores -> significance -log10(1 - probability), float32: unlike a float32 probability,
        which cannot tell 1 - 1e-8 from 1, it keeps the calibrated tail's order and resolution. With `region` (bool,
        the shape of scores), 0 outside it, and only the region's voxels are computed."""
        if region is None:
            return (self.log_exceedance(scores) / -LN10).astype(np.float32)
        out = np.zeros(np.shape(scores), np.float32)
        out[region] = self.log_exceedance(np.asarray(scores)[region]) / -LN10
        return out

    def voxel_probability(self, scores, dtype=np.float32) -> np.ndarray:
        """Raw (smoothed) scores -> calibrated probability in [0, 1]."""
        return (-np.expm1(self.log_exceedance(scores))).astype(dtype)

    def fp_knots(self) -> np.ndarray:
        """Grid indices the false-positive curve passes through: the first grid point and the last point of every
        plateau of the measured counts (where the next threshold counts fewer findings). Interpolating between
        them, instead of through every grid point, makes the curve strictly decreasing (so volume scores and
        thresholds are never tied on a plateau) while never falling below the measured counts (conservative)."""
        observed = np.nonzero(self.fp_per_cm > 0)[0]
        if observed.size == 0:
            return observed
        fp = self.fp_per_cm[: observed[-1] + 1]
        return np.unique(np.r_[0, np.nonzero(fp[1:] < fp[:-1])[0], fp.size - 1])

    def fp_curve_points(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The false-findings curve through its knots: (log(1 - threshold), decreasing; log false findings per cm),
        or None where no false finding was seen."""
        knots = self.fp_knots()
        if knots.size == 0:
            return None
        return np.log(1.0 - self.fp_thresholds[knots]), np.log(self.fp_per_cm[knots])

    def log_fp_rate(self, threshold: float | None = None, *, log_exceedance: float | None = None) -> float:
        """log of fp_rate, which keeps its resolution far out in the tail (-inf where no false finding was seen)."""
        points = self.fp_curve_points()
        if points is None:
            return float("-inf")
        xt = log_exceedance if log_exceedance is not None else np.log(max(1.0 - threshold, 1e-300))
        return float(self._log_fp_curve(points, xt, extended=False))

    def log_fp_rates(self, significance) -> np.ndarray:
        """log_fp_rate at each significance, vectorized, and strictly decreasing over all of them: below the curve's
        first threshold (rates above any measured) it continues in proportion to the voxel exceedance (slope 1 in
        log-log) instead of staying flat. What matching ensemble members by their rates needs (ensemble-max-rate);
        thresholds keep using log_fp_rate. Raises ValueError when the curve saw no false finding."""
        points = self.fp_curve_points()
        if points is None:
            raise ValueError("the calibration saw no false finding: its false-findings curve is empty")
        return self._log_fp_curve(points, np.asarray(significance, np.float64) * -LN10, extended=True)

    def _log_fp_curve(self, points: tuple[np.ndarray, np.ndarray], log_exceedance, extended: bool) -> np.ndarray:
        """The false-findings curve at log(1 - threshold): interpolated between its knots, extrapolated beyond the
        last with the tail slope; before the first knot flat, or (`extended`) with slope 1 and a tail slope of at least
        1e-3, so that it decreases strictly."""
        x, y = points  # fp_curve_points()
        xt = log_exceedance
        head = y[0] + (xt - x[0]) if extended else y[0]
        slope = max(self.fp_tail_slope, 1e-3) if extended else self.fp_tail_slope
        return np.where(xt > x[0], head, np.where(xt >= x[-1], np.interp(-xt, -x, y), y[-1] + slope * (xt - x[-1])))

    def volume_score(self, scores: np.ndarray, region: np.ndarray, spacing_mm,
                     slice_scores: np.ndarray | None = None) -> float:
        """P(a normal volume of this length has no finding as strong as this one's strongest), in [0, 1]; from the
        slice scores when the model calibrated them (P(no normal slice of as many scores as high)). 1 - the p-value,
        as detect_volume reports it."""
        return 1.0 - self.volume_p_value(scores, region, spacing_mm, slice_scores)

    def volume_p_value(self, scores: np.ndarray, region: np.ndarray, spacing_mm,
                       slice_scores: np.ndarray | None = None) -> float:
        """1 - volume_score, computed without rounding: P(a normal volume of this length has a finding (slice) as
        strong). Where the volume score rounds to 1.0 this still orders volumes, so it is the ranking key. Poisson
        model: 1 - exp(-m), m the expected number of normal findings (or slices) as strong in a volume this long."""
        return poisson_p_value(self.volume_log_expected(scores, region, spacing_mm, slice_scores))

    def volume_log_expected(self, scores: np.ndarray, region: np.ndarray, spacing_mm,
                            slice_scores: np.ndarray | None = None) -> float:
        """log of the expected number of normal findings (or normal slices) at least as strong as this volume's
        strongest, in a normal volume of this length (Poisson model)."""
        if slice_scores is not None and self.slice_quantiles is not None:
            counted = np.asarray(slice_scores)[region.reshape(region.shape[0], -1).any(1)]
            if counted.size:
                log_exc = self.slice_log_exceedance(np.array([counted.max()]))[0]
                return float(np.log(counted.size) + log_exc)
        min_voxels = min_voxels_for(self.min_size_mm3, np.prod(spacing_mm))
        floor = float(np.interp(self.fp_thresholds[0], self.voxel_levels, self.voxel_quantiles))
        level = strongest_component_level(scores, region, min_voxels, floor)
        log_exc = float(self.log_exceedance(np.array([level]))[0])
        extent_cm = scores.shape[0] * spacing_mm[0] / 10.0
        return self.log_fp_rate(log_exceedance=log_exc) + float(np.log(extent_cm))

    @classmethod
    def fit(cls, references: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]],
            min_size_mm3: float = 65.0, default_fp_per_volume: float = 0.32,
            slice_scores: np.ndarray | None = None) -> "Calibration":
        """references: (smoothed raw scores [Z, H, W], region [Z, H, W], spacing mm) of held-out normal slabs;
        slice_scores: image-level scores of the same slabs' slices with body, for methods that make them."""
        pooled = np.concatenate([s[r].ravel() for s, r, _ in references])
        if pooled.size < 1000:
            raise ValueError("calibration needs at least 1000 reference voxels of normal CT")
        quantiles, tail_scale = fit_quantiles(pooled)
        cal = cls(voxel_quantiles=quantiles, voxel_levels=VOXEL_LEVELS.copy(), fp_thresholds=FP_THRESHOLDS.copy(),
                  fp_per_cm=np.zeros_like(FP_THRESHOLDS), fp_tail_slope=1.0, voxel_tail_scale=tail_scale,
                  default_fp_per_volume=default_fp_per_volume, min_size_mm3=min_size_mm3)
        if slice_scores is not None and len(slice_scores) >= 10:  # a tail from fewer normal slices means nothing
            cal.slice_quantiles, cal.slice_tail_scale = fit_quantiles(slice_scores, tail_from=0.8)
        extent_cm, counts, shares = 0.0, np.zeros_like(FP_THRESHOLDS), []
        for scores, region, spacing in references:
            prob = cal.voxel_probability(scores, dtype=np.float64) * region
            shares.append(exceedance_shares(prob, region))
            min_voxels = min_voxels_for(min_size_mm3, np.prod(spacing))
            counts += [count_components(prob >= t, min_voxels) for t in FP_THRESHOLDS]
            extent_cm += scores.shape[0] * spacing[0] / 10.0
        # Component counts are not monotone in the threshold (low thresholds merge findings into one); the upper
        # envelope from above keeps the curve conservative and invertible.
        cal.fp_per_cm = np.maximum.accumulate((counts / extent_cm)[::-1])[::-1]
        shares = np.concatenate(shares)
        if np.isfinite(shares).any():
            cal.reference_share_max = float(np.nanmax(shares))
        observed = cal.fp_per_cm > 0
        if observed.sum() >= 3:  # slope of log(fp) against log(1 - t) over the observed tail, at least 0.25
            x, y = np.log(1.0 - FP_THRESHOLDS[observed]), np.log(cal.fp_per_cm[observed])
            cal.fp_tail_slope = float(max(0.25, np.polyfit(x, y, 1)[0]))
        return cal
