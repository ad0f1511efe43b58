"""Calibration against normal reference scores: probabilities, false-positive curve, thresholds, volume score."""

from __future__ import annotations

import numpy as np
import pytest

from medanomaly.calibration import (MIN_SLICE_REGION, REFERENCE_LEVEL, UNLIKE_FACTOR, Calibration, count_components,
                                    sensitivity_to_fp_per_volume, strongest_component_level)


def normal_slabs(seed=0, n=3, shape=(20, 48, 48)):
    rng = np.random.default_rng(seed)
    slabs = []
    for _ in range(n):
        scores = np.abs(rng.normal(size=shape)).astype(np.float32)
        region = np.zeros(shape, bool)
        region[:, 4:-4, 4:-4] = True
        slabs.append((scores, region, (2.0, 3.0, 3.0)))
    return slabs


@pytest.fixture(scope="module")
def calibration():
    return Calibration.fit(normal_slabs(), min_size_mm3=18.0)


def test_probability_is_uniform_on_normal_voxels(calibration):
    scores, region, _ = normal_slabs(seed=5, n=1)[0]
    p = calibration.voxel_probability(scores[region])
    counts, _ = np.histogram(p, bins=10, range=(0, 1))
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1


def test_probability_strictly_increasing_beyond_reference(calibration):
    top = calibration.voxel_quantiles[-1]
    scores = np.array([top * 0.9, top, top * 1.5, top * 3, top * 10])
    log_exc = calibration.log_exceedance(scores)
    assert np.all(np.diff(log_exc) < 0), "exceedance keeps falling far beyond the reference"
    np.testing.assert_allclose(calibration.voxel_probability(scores[:2], dtype=np.float64),
                               -np.expm1(log_exc[:2]))
    rates = [calibration.fp_rate(log_exceedance=x) for x in log_exc]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_fp_curve_decreases_and_thresholds_follow_targets(calibration):
    rates = [calibration.fp_rate(t) for t in calibration.fp_thresholds]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    t_low = calibration.threshold_for(5.0, 20.0)
    t_high = calibration.threshold_for(0.05, 20.0)
    assert t_low < t_high
    assert calibration.fp_rate(t_low) * 20.0 == pytest.approx(5.0, rel=0.05)


def test_thresholds_far_beyond_float32_resolution_stay_distinct(calibration):
    """Targets of 1e-12 false findings per volume need thresholds of 1 - 1e-20 and more, which neither a float32
    nor a float64 probability resolves; in significance they stay distinct, and each finding strength's expected
    count is the target that puts the threshold there."""
    levels = [calibration.threshold_significance(f, 20.0) for f in (3.0, 0.3, 1e-3, 1e-6, 1e-12)]
    assert all(a < b for a, b in zip(levels, levels[1:]))
    assert levels[2] > -np.log10(np.finfo(np.float32).eps)  # past what a float32 probability tells from 1
    for target, level in zip((3.0, 0.3, 1e-3, 1e-6, 1e-12), levels):
        assert np.exp(calibration.log_expected_findings(level, 20.0)) == pytest.approx(target, rel=1e-6)
    assert calibration.threshold_for(0.3, 20.0) == pytest.approx(1.0 - 10.0 ** -levels[1], abs=1e-15)
    scores = calibration.voxel_quantiles[-1] * np.array([0.5, 1.0, 2.0, 8.0, 40.0])
    significance = calibration.voxel_significance(scores)
    assert significance.dtype == np.float32 and np.all(np.diff(significance) > 0)
    np.testing.assert_allclose(significance, -calibration.log_exceedance(scores) / np.log(10.0), rtol=1e-6)
    region = np.array([True, False, True, True, False])
    assert np.array_equal(calibration.voxel_significance(scores, region), significance * region)


def test_fp_curve_is_conservative_and_strictly_decreasing_past_the_first_plateau():
    """Few reference findings make plateaus; the curve interpolates between plateau ends, so it never under-states
    the measured rate and never ties two volume scores or thresholds on a plateau."""
    cal = Calibration.fit(normal_slabs(seed=4, n=1), min_size_mm3=18.0)
    knots = cal.fp_knots()
    observed = np.nonzero(cal.fp_per_cm > 0)[0]
    flat = np.nonzero(cal.fp_per_cm[1:] == cal.fp_per_cm[:-1])[0]
    flat = flat[flat < observed[-1]]  # plateaus of measured (non-zero) counts
    assert (flat >= knots[1]).any(), "the fixture should have a plateau past the first to test"
    rates = np.array([cal.fp_rate(t) for t in cal.fp_thresholds[: observed[-1] + 1]])
    assert np.all(rates >= cal.fp_per_cm[: observed[-1] + 1] * (1 - 1e-9))
    past_first = rates[knots[1]:] if knots.size > 1 else rates
    assert np.all(np.diff(past_first) < 0)
    # two levels inside one plateau of the measured counts get different volume-level rates
    i = int(flat[flat >= knots[1]][0])
    a, b = np.log(1 - cal.fp_thresholds[i]), np.log(1 - cal.fp_thresholds[i + 1])
    assert cal.fp_per_cm[i] == cal.fp_per_cm[i + 1]
    assert cal.fp_rate(log_exceedance=a) > cal.fp_rate(log_exceedance=0.5 * (a + b)) > cal.fp_rate(log_exceedance=b)


def test_fp_rate_matches_what_it_was_fitted_on(calibration):
    """The stored curve is the upper envelope (from above) of component counts on the reference slabs."""
    slabs = normal_slabs()
    extent = sum(s.shape[0] * sp[0] / 10 for s, _, sp in slabs)
    min_voxels = 1  # 18 mm3 over 2 x 3 x 3 mm voxels
    raw = np.array([sum(count_components((calibration.voxel_probability(s, dtype=np.float64) * r) >= t, min_voxels)
                        for s, r, _ in slabs) for t in calibration.fp_thresholds]) / extent
    envelope = np.maximum.accumulate(raw[::-1])[::-1]
    np.testing.assert_allclose(calibration.fp_per_cm, envelope)
    assert raw.max() > 0


def test_volume_score_ranks_an_anomaly_above_normal(calibration):
    normal, region, spacing = normal_slabs(seed=9, n=1)[0]
    anomalous = normal.copy()
    anomalous[8:12, 20:26, 20:26] += 6.0
    s_normal = calibration.volume_score(normal, region, spacing)
    s_anom = calibration.volume_score(anomalous, region, spacing)
    assert 0.0 <= s_normal < s_anom <= 1.0
    assert s_anom > 0.99


def test_volume_p_value_orders_volumes_whose_scores_round_to_one(calibration):
    """Two anomalies far beyond anything normal: both volume scores read 1.0, but the p-values (1 - score without
    rounding) still put the stronger one first; for a normal slab score + p-value = 1."""
    normal, region, spacing = normal_slabs(seed=9, n=1)[0]
    p_normal = calibration.volume_p_value(normal, region, spacing)
    assert p_normal + calibration.volume_score(normal, region, spacing) == pytest.approx(1.0, abs=1e-12)
    strong, stronger = normal.copy(), normal.copy()
    strong[8:12, 20:26, 20:26] += 60.0
    stronger[8:12, 20:26, 20:26] += 90.0
    assert calibration.volume_score(strong, region, spacing) == 1.0
    assert calibration.volume_score(stronger, region, spacing) == 1.0
    p_strong = calibration.volume_p_value(strong, region, spacing)
    p_stronger = calibration.volume_p_value(stronger, region, spacing)
    assert 0.0 < p_stronger < p_strong < 1e-12 < p_normal


def test_strongest_component_level_by_hand():
    scores = np.zeros((5, 10, 10), np.float32)
    scores[2, 2:4, 2:4] = 5.0  # 4 voxels at 5
    scores[1, 7, 7] = 9.0  # a single voxel at 9
    region = np.ones_like(scores, bool)
    assert strongest_component_level(scores, region, 4, 0.0) == pytest.approx(5.0, abs=1e-4)
    assert strongest_component_level(scores, region, 1, 0.0) == pytest.approx(9.0, abs=1e-4)


def test_strongest_finding_p_value_by_hand():
    """The volume p-value of a significance map: the Poisson probability of a normal finding at least as strong as
    its strongest component of the minimum size, under a false-finding curve; the floor's where none reaches it."""
    from medanomaly.findings import strongest_finding_p_value
    from medanomaly.significance import FalseFindingCurve

    class Curve(FalseFindingCurve):  # 100 * 10^-s false findings per cm at significance s
        def log_fp_rate(self, threshold=None, *, log_exceedance=None):
            return np.log(100.0) + float(log_exceedance if log_exceedance is not None else np.log1p(-threshold))

    significance = np.zeros((5, 10, 10), np.float32)
    significance[2, 2:4, 2:4] = 5.0  # 4 voxels at 5
    significance[1, 7, 7] = 9.0  # one voxel at 9: too small for a finding of 4
    extent_cm = 2.0
    expected = 200.0 * 10.0**-5  # normal findings at least this strong in 2 cm
    p = strongest_finding_p_value(significance, Curve(), extent_cm, 4)
    assert p == pytest.approx(-np.expm1(-expected), rel=1e-4)
    assert strongest_finding_p_value(significance, Curve(), extent_cm, 1) == pytest.approx(
        -np.expm1(-200.0 * 10.0**-9), rel=1e-4)
    # nothing of 5 voxels above the floor, the level where normal CT makes 50 findings in this length (s = log10 4;
    # the map's zeros lie below it): that level's p-value, 1 - e^-50; with a floor of 2 findings, 1 - e^-2
    assert strongest_finding_p_value(significance, Curve(), extent_cm, 5) == pytest.approx(-np.expm1(-50.0))
    assert strongest_finding_p_value(significance, Curve(), extent_cm, 5, 2.0) == pytest.approx(-np.expm1(-2.0),
                                                                                                rel=1e-6)
    assert strongest_finding_p_value(significance, Curve(), extent_cm, 4, 2.0) == pytest.approx(p, rel=1e-6)


def brute_strongest_level(scores, region, min_voxels, floor):
    """Every value of the scores from the top down, until one holds a large enough component."""
    for level in np.unique(scores[region & (scores >= floor)])[::-1]:
        if count_components(region & (scores >= level), min_voxels) > 0:
            return float(level)
    return float(floor)


@pytest.mark.parametrize("seed", range(6))
def test_strongest_component_level_matches_brute_force(seed):
    """Smoothed noise gives many components of many sizes at every level; the search per component of the floor's
    mask must give exactly the level that trying every value gives."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    scores = ndi.gaussian_filter(rng.normal(size=(6, 24, 24)), 1.0).astype(np.float32)
    region = np.ones_like(scores, bool)
    region[:, :, :4] = False  # a region that cuts components
    for min_voxels, floor in ((1, 0.0), (5, 0.0), (12, -0.05), (40, 0.02), (10_000, 0.0)):
        got = strongest_component_level(scores, region, min_voxels, floor)
        assert got == brute_strongest_level(scores, region, min_voxels, floor)
    assert strongest_component_level(scores, region, 1, 99.0) == 99.0  # nothing above the floor


def test_sensitivity_mapping():
    assert sensitivity_to_fp_per_volume(0.0) == pytest.approx(0.01)
    assert sensitivity_to_fp_per_volume(1.0) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        sensitivity_to_fp_per_volume(1.5)


def test_card_round_trip(calibration):
    again = Calibration.from_card(calibration.to_card())
    x = np.linspace(0, 5, 50)
    np.testing.assert_array_equal(again.voxel_probability(x), calibration.voxel_probability(x))
    assert again.threshold_for(0.3, 30) == calibration.threshold_for(0.3, 30)


def test_reference_share_max_is_the_highest_share_of_any_reference_slice(calibration):
    shares = []
    for scores, region, _ in normal_slabs():
        probability = calibration.voxel_probability(scores)
        for z in range(scores.shape[0]):
            inside = probability[z][region[z]]
            shares.append(np.count_nonzero(inside >= REFERENCE_LEVEL) / inside.size)
    assert calibration.reference_share_max == pytest.approx(max(shares), rel=1e-9)
    # about 1% of normal voxels lie above the 99th percentile; the highest of 60 slices somewhat more
    assert 0.01 < calibration.reference_share_max < 0.03
    assert Calibration.from_card(calibration.to_card()).reference_share_max == calibration.reference_share_max


def test_reference_check_flags_a_shifted_slice_but_not_a_focal_lesion(calibration):
    scores, region, _ = normal_slabs(seed=7, n=1)[0]
    scores = scores.copy()
    scores[5][region[5]] += 0.8  # the whole slice scores higher: tissue unlike the reference (another region, kernel)
    # a focal lesion of 4 voxels among 1600 (0.25%: a 20 mm nodule in a 256^2 slice of body at 1.75 mm is about 100
    # of 40,000): a finding, not a different scan
    scores[10, 20:22, 20:22] += 4.0
    small = region.copy()
    small[15] = False
    small[15, 10:20, 10:20] = True  # 100 region voxels: too few to measure a share
    assert small[15].sum() < MIN_SLICE_REGION
    ratio = calibration.unlike_reference(calibration.voxel_probability(scores), small)
    assert ratio.shape == (scores.shape[0],)
    assert ratio[5] >= UNLIKE_FACTOR
    assert np.isnan(ratio[15])
    others = np.delete(ratio, [5, 15])
    assert np.all(others < UNLIKE_FACTOR)
    assert ratio[10] > np.median(others)  # the lesion does raise its slice's share, below the factor


def test_calibration_without_reference_check_skips_it(calibration):
    card = calibration.to_card()
    del card["reference_share_max"]  # a bundle calibrated before the check existed
    old = Calibration.from_card(card)
    scores, region, _ = normal_slabs(seed=3, n=1)[0]
    assert old.unlike_reference(old.voxel_probability(scores), region) is None
