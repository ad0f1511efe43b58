"""Significance, -log10(1 - probability): the form in which heatmaps are thresholded and ranked, and the false-findings
curve's thresholds and expected counts in it. A float32 probability rounds everything above 1 - 6e-8 to 1, where a
whole CT's detection thresholds lie; a float32 significance keeps 7 digits there. numpy only: the batch's main
process imports it through the ensemble module without loading scipy or torch."""

from __future__ import annotations

import numpy as np

LN10 = float(np.log(10.0))
MAX_SIGNIFICANCE = 300.0  # thresholds are searched up to probability 1 - 1e-300


def probability_of_significance(significance, dtype=np.float32):
    """Significance s = -log10(1 - p) -> probability p (in `dtype`; float32 rounds p above 1 - 6e-8 to 1)."""
    x = np.asarray(significance, dtype)
    if x.ndim == 0:
        return dtype(-np.expm1(x * dtype(-LN10)))
    out = np.multiply(x, dtype(-LN10), dtype=dtype)  # one new array, then in place (a CT's map is large)
    np.expm1(out, out=out)
    return np.negative(out, out=out)


def poisson_p_value(log_expected: float) -> float:
    """P(at least one) for a Poisson count of mean exp(log_expected): 1 - exp(-m), without rounding where m is small
    (the p-value of a finding or a volume from the expected number of normal findings as strong)."""
    return float(-np.expm1(-np.exp(log_expected)))


def significance_for_rate(log_fp_rate, fp_per_volume: float, extent_cm: float) -> float:
    """The lowest significance s = -log10(1 - threshold) with exp(log_fp_rate(log(1 - threshold))) * extent_cm <=
    fp_per_volume, for a non-increasing false-findings-per-cm curve (bisection on s in [0, MAX_SIGNIFICANCE]; in
    the log domain, so thresholds far beyond what a float probability resolves stay distinct)."""
    allowed = np.log(max(fp_per_volume, 1e-300) / max(extent_cm, 1e-6))
    enough, too_many = MAX_SIGNIFICANCE, 0.0
    for _ in range(80):
        mid = 0.5 * (enough + too_many)
        if log_fp_rate(-mid * LN10) > allowed:
            too_many = mid
        else:
            enough = mid
    return float(enough)


class FalseFindingCurve:
    """Thresholds, rates and expected counts from a log false-findings-per-cm curve; subclasses define
    log_fp_rate(log_exceedance) (Calibration; ensemble.EnsembleCalibration by the union bound)."""

    def log_fp_rate(self, threshold: float | None = None, *, log_exceedance: float | None = None) -> float:
        raise NotImplementedError

    def fp_rate(self, threshold: float | None = None, *, log_exceedance: float | None = None) -> float:
        """False-positive findings per cm of normal CT at a probability threshold (or at log(1 - threshold))."""
        return float(np.exp(self.log_fp_rate(threshold, log_exceedance=log_exceedance)))

    def threshold_significance(self, fp_per_volume: float, extent_cm: float) -> float:
        """-log10(1 - t) of the threshold t at which a normal volume of this length expects `fp_per_volume`
        findings (the form findings are thresholded in)."""
        return significance_for_rate(lambda x: self.log_fp_rate(log_exceedance=x), fp_per_volume, extent_cm)

    def threshold_for(self, fp_per_volume: float, extent_cm: float) -> float:
        """The same threshold as a probability (1.0 where float64 cannot tell it from 1)."""
        return float(probability_of_significance(self.threshold_significance(fp_per_volume, extent_cm), np.float64))

    def log_expected_findings(self, significance: float, extent_cm: float) -> float:
        """log of the expected number of normal findings at least this strong (they keep the minimum size at
        probability 1 - 10^-significance) in a normal volume of this length: the --fp-rate at which a finding of
        this strength drops out."""
        return self.log_fp_rate(log_exceedance=-float(significance) * LN10) + float(np.log(max(extent_cm, 1e-6)))
