"""Every lab metric against scikit-learn (or by hand) on small cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medanomaly.metrics import (FROC, FindingsFROC, PooledVoxelCurve, auroc_interval, average_precision,
                                localization_hits, proportion_interval, roc_auc)


def test_auroc_and_ap_by_hand():
    scores = [0.9, 0.8, 0.7, 0.6]
    labels = [1, 0, 1, 0]
    assert roc_auc(scores, labels) == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + labels * 0.4, 1)  # rounding makes ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


@pytest.mark.parametrize("found,total", [(6, 14), (0, 4), (14, 14), (13, 34)])
def test_proportion_interval_is_wilsons(found, total):
    z = 1.959963984540054  # the normal quantile of 0.975
    p = found / total
    centre = (p + z**2 / (2 * total)) / (1 + z**2 / total)
    half = z / (1 + z**2 / total) * np.sqrt(p * (1 - p) / total + z**2 / (4 * total**2))
    low, high = proportion_interval(found, total)
    assert low == pytest.approx(max(0.0, centre - half)) and high == pytest.approx(min(1.0, centre + half))
    assert low <= p <= high
    assert all(np.isnan(proportion_interval(0, 0)))


def test_auroc_interval_brackets_the_auroc_and_narrows_with_more_cases():
    assert auroc_interval([0.9, 0.8, 0.7, 0.1, 0.2], [1, 1, 1, 0, 0]) == (1.0, 1.0)  # separated in every resample
    rng = np.random.default_rng(3)

    def case(n_pos, n_neg):
        scores = np.concatenate([rng.normal(1.0, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)])
        labels = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
        return scores, labels

    few, many = case(34, 2), case(340, 200)
    widths = []
    for scores, labels in (few, many):
        low, high = auroc_interval(scores, labels)
        assert 0 <= low <= roc_auc(scores, labels) <= high <= 1
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # 2 negatives leave the AUROC far less certain than 200
    assert auroc_interval(*few) == auroc_interval(*few)  # seeded
    assert all(np.isnan(auroc_interval([0.5, 0.6], [1, 1])))
    assert auroc_interval([0.9, 0.3], [1, 0]) == (1.0, 1.0)  # one case per class: nothing to resample


def test_pooled_voxel_curve_matches_sklearn_over_cases():
    rng = np.random.default_rng(7)
    curve = PooledVoxelCurve()
    all_s, all_y = [], []
    for _ in range(3):
        y = rng.random((4, 8, 8)) < 0.1
        s = np.clip(rng.random((4, 8, 8)) * 0.7 + y * 0.3, 0, 0.9999).astype(np.float32)
        s = np.round(s, 3)
        curve.add(-np.log10(1.0 - s.astype(np.float64)), y)
        all_s.append(s.ravel())
        all_y.append(y.ravel())
    s, y = np.concatenate(all_s), np.concatenate(all_y)
    assert curve.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert curve.auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-9)


def test_best_dice_by_hand():
    curve = PooledVoxelCurve()
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.3, 0.85, 0.2, 0.1, 0.1, 0.1])
    curve.add(-np.log10(1.0 - s), y)
    # thresholds: >=0.9 -> TP1 FP0 FN2: 2/4; >=0.85 -> TP1 FP1: 2/5; >=0.8 -> TP2 FP1 FN1: 4/6; >=0.3 -> TP3 FP1: 6/7
    dice, threshold = curve.best_dice()
    assert dice == pytest.approx(6 / 7)
    assert 0.29 < threshold <= 0.3


def test_froc_by_hand():
    froc = FROC()
    heat = np.zeros((3, 10, 10), np.float32)
    lesions = np.zeros((3, 10, 10), np.uint8)
    lesions[1, 1:3, 1:3] = 1  # found with peak 0.9
    lesions[1, 6:8, 6:8] = 2  # missed
    heat[1, 1:3, 1:3] = 0.9
    heat[1, 4, 8] = 0.95  # a false positive, stronger than the hit
    froc.add_case(heat, lesions, base_threshold=0.5, min_voxels=1, case="a")
    normal = np.zeros_like(heat)
    normal[0, 0, 0] = 0.7  # a weaker false positive in a normal volume
    froc.add_case(normal, None, base_threshold=0.5, min_voxels=1, case="n")
    assert froc.n_volumes == 2
    # thresholds 0.95 -> 1 FP (0.5/vol), sens 0; 0.9 -> 1 FP, sens 1/2; 0.7 -> 2 FP (1/vol), sens 1/2
    assert froc.sensitivity_at(0.5) == pytest.approx(0.5)
    assert froc.sensitivity_at(0.25) == pytest.approx(0.0)
    assert froc.sensitivity_at(4.0) == pytest.approx(0.5)
    table = froc.lesion_table(0.5)  # at 0.5 FP per volume the threshold is 0.9: lesion 1 found, lesion 2 not
    assert table["threshold"] == pytest.approx(0.9)
    assert [(row["label"], row["found"]) for row in table["lesions"]] == [(1, True), (2, False)]
    assert table["lesions"][1]["best"] == -1.0 and froc.lesion_table(0.25)["lesions"][0]["found"] is False
    # a minimum size removes the 1-voxel false positives
    sized = FROC()
    sized.add_case(heat, lesions, base_threshold=0.5, min_voxels=2, case="a")
    assert sized.false_positive_scores == []


def test_froc_sprawling_candidate_claims_no_lesion():
    heat = np.zeros((3, 20, 20), np.float32)
    lesions = np.zeros((3, 20, 20), np.uint8)
    lesions[1, 2:4, 2:4] = 1
    heat[:, :, :] = 0.6  # one candidate covering everything, peak far from the lesion
    heat[0, 15, 15] = 0.9
    froc = FROC()
    froc.add_case(heat, lesions, base_threshold=0.5, min_voxels=1)
    assert froc.sensitivity_at(100.0) == 0.0 and froc.false_positive_scores == [pytest.approx(0.9)]


def test_findings_froc_judges_every_level():
    """A lesion merged at low levels with a larger, stronger normal region is found at a level where the two have come
    apart (FROC's single-level candidate loses it); false findings are counted per level as detect would report them."""
    sig = np.zeros((3, 20, 20), np.float32)
    lesions = np.zeros((3, 20, 20), np.uint8)
    lesions[1, 2:4, 2:4] = 1
    sig[1, 2:4, 2:4] = 6.0  # the lesion
    sig[1, 4:12, 2:12] = 3.0  # normal tissue touching it, larger, below the lesion at higher levels
    sig[1, 10, 10] = 8.0  # and its peak, stronger than the lesion
    sig[0, 15:17, 15:17] = 4.0  # a separate false finding of 4 voxels
    levels = np.array([2.0, 3.5, 5.0, 7.0, 9.0])
    froc = FindingsFROC(levels=levels)
    froc.add_case(sig, lesions, min_voxels=2, case="a")
    froc.add_case(np.zeros_like(sig), None, min_voxels=2, case="n")
    # level 2: one merged component (peak outside the lesion, lesion 4 of 84 voxels) + the 4-voxel one: 2 FP, no hit
    # level 3.5: the lesion alone (hit) + the 4-voxel one (FP); level 5: the lesion alone; 7 and 9: nothing
    assert froc.false_findings.tolist() == [2, 1, 0, 0, 0]
    assert froc.lesions[0]["hit"].tolist() == [False, True, True, False, False]
    assert froc.sensitivity_at(0.0) == 1.0  # level 5: no false finding in either volume
    old = FROC()
    old.add_case(sig, lesions, base_threshold=2.0, min_voxels=2)
    assert old.sensitivity_at(100.0) == 0.0
    # a minimum size above the lesion's 4 voxels leaves only false findings
    sized = FindingsFROC(levels=levels)
    sized.add_case(sig, lesions, min_voxels=5, case="a")
    assert sized.false_findings.tolist() == [1, 0, 0, 0, 0] and sized.sensitivity_at(10.0) == 0.0


def test_localization_by_hand():
    heat = np.zeros((2, 64, 64), np.float32)
    lesion = np.zeros((2, 64, 64), bool)
    lesion[0, 50:54, 50:54] = True
    heat[0, 48:56, 48:56] = 1.0  # hottest patch covers the lesion
    lesion[1, 5:8, 5:8] = True
    heat[1, 40:60, 40:60] = 1.0  # hottest patch far from the lesion
    assert localization_hits(heat, lesion, patch=32).tolist() == [True, False]
