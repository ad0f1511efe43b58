"""`--model ensemble:A,B`: members' calibrated maps and volume scores combined by mean or max, with union-bound
thresholds; from the API, the command line and a batch."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
from conftest import ROOT

from medanomaly.api import detect_volume
from medanomaly.calibration import Calibration
from medanomaly.cli import main
from medanomaly.ensemble import Ensemble, load_scorer, maximum_with_source, model_identity, parse_spec, resolved_spec
from medanomaly.errors import InputError
from medanomaly.volumes import volume_from_image

MEMBERS = ["chest-ct-vqvae-recon", "chest-ct-hu-outlier"]


def test_parse_spec():
    assert parse_spec("chest-ct-vqvae-recon") is None
    assert parse_spec("ensemble:a, b") == ("mean", ["a", "b"])
    assert parse_spec("ensemble-max:a,b,c") == ("max", ["a", "b", "c"])
    assert parse_spec("ensemble-max-rate:a,b") == ("max-rate", ["a", "b"])
    with pytest.raises(InputError, match="at least two"):
        parse_spec("ensemble:a")


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_ensemble_combines_calibrated_members(small_ct, combine):
    volume = volume_from_image(small_ct, name="small")
    singles = [detect_volume(volume, name, device="cpu") for name in MEMBERS]
    prefix = "ensemble:" if combine == "mean" else "ensemble-max:"
    result = detect_volume(volume, prefix + ",".join(MEMBERS), device="cpu")
    reduce = np.mean if combine == "mean" else np.max
    np.testing.assert_allclose(result.heatmap, reduce(np.stack([s.heatmap for s in singles]), 0), atol=1e-6)
    member_significance = np.stack([s.significance for s in singles]).astype(np.float64)
    expected = (member_significance.max(0) if combine == "max"
                else -np.log10(np.mean(10.0 ** -member_significance, 0)))
    np.testing.assert_allclose(result.significance, expected, rtol=1e-5, atol=1e-6)
    assert result.volume_p_value == pytest.approx(1.0 - result.volume_score, abs=1e-6)
    assert result.settings["ensemble"]["member_volume_scores"] == [s.volume_score for s in singles]
    assert result.heatmap.shape == volume.hu.shape
    assert [m["name"] for m in result.model["members"]] == MEMBERS
    assert result.settings["ensemble"]["combine"] == combine
    # the union bound: the ensemble's threshold is above every member's for the same target
    assert all(result.threshold >= s.threshold - 1e-12 for s in singles)
    # the reference check: a slice is unlike the reference when it is unlike any member's
    check = result.reference_check
    assert check["available"] and check["slices_checked"] == max(s.reference_check["slices_checked"] for s in singles)
    assert check["max_ratio"] == max(s.reference_check["max_ratio"] for s in singles)
    assert check["slices_unlike"] >= max(s.reference_check["slices_unlike"] for s in singles)


def test_maximum_with_source_is_the_first_highest_member():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 4, (5, 6, 7)).astype(np.float32) for _ in range(3)]  # small integers: many ties
    strongest, source = maximum_with_source(maps)
    stacked = np.stack(maps)
    np.testing.assert_array_equal(strongest, stacked.max(0))
    np.testing.assert_array_equal(source, stacked.argmax(0))  # argmax takes the first of equal maxima too
    assert source.dtype == np.uint8 and (source > 0).any() and maps[0].max() == 3  # the inputs are not changed


@pytest.mark.parametrize("combine", ["ensemble:", "ensemble-max:", "ensemble-max-rate:"])
def test_each_finding_names_the_member_that_flagged_it(small_ct, combine):
    """flagged_by is the member with the highest significance at the finding's peak voxel (its own calibrated map,
    or, with max-rate, that map matched by rate); member_shares, the share of the finding's voxels where each member
    is highest; a single model's findings name the model."""
    from test_outputs import insert_nodule

    image, _ = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    volume = volume_from_image(image, name="nodule")
    scorer = load_scorer(combine + ",".join(MEMBERS))
    singles = [detect_volume(volume, member, device="cpu") for member in scorer.members]
    # loose settings, so that each rule has findings to check
    result = detect_volume(volume, scorer, device="cpu", fp_rate=10.0, min_size_mm3=5.0)
    assert result.findings
    matched = [s.significance if scorer.member_transform(i) is None else scorer.member_transform(i)(s.significance)
               for i, s in enumerate(singles)]
    for finding in result.findings:
        inside = result.labels == finding["label"]
        peak = np.unravel_index(np.argmax(np.where(inside, result.significance, -np.inf)), inside.shape)
        at_peak = [float(m[peak]) for m in matched]
        assert finding["flagged_by"] == MEMBERS[int(np.argmax(at_peak))]
        assert list(finding["member_shares"]) == MEMBERS
        assert sum(finding["member_shares"].values()) == pytest.approx(1.0, abs=2e-3)
        highest = np.argmax(np.stack([m[inside] for m in matched]), 0)
        assert finding["member_shares"][MEMBERS[1]] == pytest.approx(np.mean(highest == 1), abs=1e-3)
    for finding in singles[1].findings:
        assert finding["flagged_by"] == MEMBERS[1] and "member_shares" not in finding


def test_find_findings_attributes_each_finding_by_its_peak():
    import SimpleITK as sitk

    from medanomaly.findings import find_findings

    significance = np.zeros((8, 16, 16), np.float32)
    significance[2:5, 2:6, 2:6] = 5.0  # a finding of 48 voxels, its peak at (3, 4, 4)
    significance[3, 4, 4] = 9.0
    significance[6, 12, 12] = 9.0  # one voxel, below the minimum size
    source = np.zeros(significance.shape, np.uint8)
    source[2:5, 2:6, 4:6] = 1  # member 1 is highest over half of the finding, its peak included
    image = sitk.GetImageFromArray(significance)  # 1 mm voxels
    hu = np.zeros(significance.shape, np.int16)
    _, findings, _ = find_findings(significance, hu, image, 3.0, 10.0, members=["a", "b"], source=source)
    assert [(f["voxels"], f["flagged_by"], f["member_shares"]) for f in findings] == [(48, "b", {"a": 0.5, "b": 0.5})]
    # no finding of the minimum size: nothing to attribute
    assert find_findings(significance, hu, image, 3.0, 100.0, members=["a", "b"], source=source)[1] == []
    _, (single,), _ = find_findings(significance, hu, image, 3.0, 10.0, members=["solo"])
    assert single["flagged_by"] == "solo" and "member_shares" not in single


def test_mean_of_members_far_in_the_tail():
    """The mean combines probabilities (1 - p averaged), in significance so that it neither rounds to 1 nor
    underflows where float32 10^-s would."""
    scorer = load_scorer("ensemble:" + ",".join(MEMBERS))
    a = np.array([200.0, 7.0, 0.0, 60.0], np.float32)
    b = np.array([210.0, 7.0, 3.0, 60.0], np.float32)
    want = [200 + np.log10(2 / (1 + 1e-10)), 7.0, -np.log10((1 + 1e-3) / 2), 60.0]
    np.testing.assert_allclose(scorer.combine_maps([a, b])[0], want, rtol=1e-6)


def test_union_bound_threshold_meets_the_target():
    scorer = load_scorer("ensemble:" + ",".join(MEMBERS))
    members = [Calibration.from_card(m.card["calibration"]) for m in scorer.members]
    for target, extent in ((0.32, 30.0), (2.0, 12.0), (1e-9, 30.0)):
        s = scorer.calibration.threshold_significance(target, extent)
        total = sum(c.fp_rate(log_exceedance=-s * np.log(10.0)) for c in members) * extent
        assert target * 0.999 <= total <= target * 1.001


def test_ensemble_from_the_command_line_and_in_a_batch(small_ct_file, tmp_path, capsys):
    spec = "ensemble-max:" + ",".join(MEMBERS)
    assert main(["-q", "detect", str(small_ct_file), "-o", str(tmp_path / "out"), "--model", spec]) == 0
    findings = json.loads((tmp_path / "out" / "small_ct" / "findings.json").read_text())
    assert findings["model"]["method"] == "ensemble"
    capsys.readouterr()
    # loose settings, for findings to print: the table names the member that flagged each
    assert main(["detect", str(small_ct_file), "-o", str(tmp_path / "loose"), "--model", spec, "--fp-rate", "10",
                 "--min-size-mm3", "5"]) == 0
    rows = capsys.readouterr().out.splitlines()
    header = next(i for i, row in enumerate(rows) if "flagged by" in row)
    printed = json.loads((tmp_path / "loose" / "small_ct" / "findings.json").read_text())["findings"]
    shown = printed[:20]  # the table's first 20
    assert shown and [row.split()[-1] for row in rows[header + 1:header + 1 + len(shown)]] == [
        f["flagged_by"] for f in shown]
    assert main(["detect", str(small_ct_file), "-o", str(tmp_path / "bad"), "--model", "ensemble:" + MEMBERS[0]]) == 2
    err = capsys.readouterr().err
    assert "at least two" in err and "Traceback" not in err
    # batch workers get resolved bundle paths; the identity changes with the combination rule
    assert resolved_spec(spec).startswith("ensemble-max:" + str(ROOT / "models"))
    assert model_identity(spec) != model_identity("ensemble:" + ",".join(MEMBERS))
    assert isinstance(load_scorer(resolved_spec(spec)), Ensemble)


def test_ensemble_batch_rows(small_ct_file, tmp_path):
    pytest.importorskip("distributed")
    from medanomaly.batch import batch

    rows = batch([str(small_ct_file)], tmp_path / "b", model="ensemble:" + ",".join(MEMBERS), workers=1,
                 memory_limit="2GB", device="cpu", overview=False)
    assert [r["status"] for r in rows] == ["ok"]
    with open(tmp_path / "b" / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert row["case"] == "small_ct"
    findings = json.loads((tmp_path / "b" / "small_ct" / "findings.json").read_text())["findings"]
    assert row["top_finding_flagged_by"] == (findings[0]["flagged_by"] if findings else "")


def test_max_rate_matches_members_by_false_finding_rate():
    """max-rate maps each member's significance to the common curve's level of the same false-finding rate, so at a
    target rate each member runs at 1/M of it: its threshold alone at R/M maps to the ensemble's threshold at R."""
    scorer = load_scorer("ensemble-max-rate:" + ",".join(MEMBERS))
    members = scorer.calibration.members
    assert [c.fp_tail_slope for c in members] and members[0].log_fp_rates(3.0) != members[1].log_fp_rates(3.0)
    levels = np.array([0.5, 1.5, 2.5, 4.0, 6.0, 9.0, 30.0])
    common = scorer.calibration.common_log_fp_rates
    for i, c in enumerate(members):
        mapped = scorer.member_transform(i)(levels.astype(np.float32))
        assert np.all(np.diff(mapped) > 0)  # order within a member is kept
        np.testing.assert_allclose(common(mapped.astype(np.float64)), c.log_fp_rates(levels), atol=2e-3)
    for target, extent in ((0.32, 30.0), (2.0, 12.0), (10.0, 4.0)):
        ensemble_level = scorer.calibration.threshold_significance(target, extent)
        for i, c in enumerate(members):
            own = np.float32(c.threshold_significance(target / len(members), extent))
            assert scorer.member_transform(i)(np.array([own]))[0] == pytest.approx(ensemble_level, abs=5e-3)
        # and the union bound holds with equality: M members each at the common curve's rate
        total = np.exp(scorer.calibration.log_fp_rate(log_exceedance=-ensemble_level * np.log(10.0))) * extent
        assert total == pytest.approx(target, rel=1e-3)


def test_max_rate_detects_on_the_input_grid(small_ct):
    volume = volume_from_image(small_ct, name="small")
    spec = "ensemble-max-rate:" + ",".join(MEMBERS)
    plain = detect_volume(volume, "ensemble-max:" + ",".join(MEMBERS), device="cpu")
    result = detect_volume(volume, spec, device="cpu")
    assert result.significance.shape == volume.hu.shape and result.settings["ensemble"]["combine"] == "max-rate"
    assert result.model["name"].startswith("ensemble-max-rate(")
    # the same members and their own volume p-values; only the combination differs
    assert result.settings["ensemble"]["member_volume_scores"] == plain.settings["ensemble"]["member_volume_scores"]
    assert not np.array_equal(result.significance, plain.significance)
    assert model_identity(spec) != model_identity("ensemble-max:" + ",".join(MEMBERS))


@pytest.mark.parametrize("combine", ["ensemble:", "ensemble-max:", "ensemble-max-rate:"])
def test_ensemble_volume_p_value_is_its_strongest_findings(small_ct, combine):
    """An ensemble's volume p-value is the p-value its strongest finding carries wherever it is reported: with the
    threshold lowered until findings appear, the first finding's p-value is the volume's, whichever member made it."""
    volume = volume_from_image(small_ct, name="small")
    result = detect_volume(volume, combine + ",".join(MEMBERS), device="cpu", fp_rate=20.0)
    assert result.findings, "at 20 false findings per volume the small CT has findings"
    strongest = max(result.findings, key=lambda f: f["significance"])
    assert strongest["id"] == 1  # findings are ranked by strength
    assert result.volume_p_value == pytest.approx(strongest["p_value"], rel=1e-3)
    assert 0.0 < result.volume_p_value < 1.0
    # the same volume at a stricter sensitivity: other findings, the same volume p-value
    strict = detect_volume(volume, combine + ",".join(MEMBERS), device="cpu", fp_rate=0.1)
    assert strict.volume_p_value == result.volume_p_value and len(strict.findings) < len(result.findings)


def test_match_levels_is_the_tables_interpolation():
    from medanomaly.ensemble import MATCH_GRID, match_levels

    table = np.sqrt(MATCH_GRID) * 3 + 0.1 * MATCH_GRID  # increasing, curved
    s = np.r_[np.random.default_rng(0).uniform(0, 60, 10000), [0.0, 39.998, 39.999, 40.0, 299.9, 300.0, 1e3]]
    np.testing.assert_allclose(match_levels(s.astype(np.float32), table),
                               np.interp(s.astype(np.float32), MATCH_GRID, table), rtol=2e-6, atol=2e-6)


def test_max_rate_needs_every_members_false_finding_curve():
    """A member whose calibration counted no false finding has no rate to match by: a one-line error naming it."""
    scorer = load_scorer("ensemble-max-rate:" + ",".join(MEMBERS))
    quiet = copy.copy(scorer.members[1])
    cal = dict(quiet.card["calibration"], fp_per_cm=[0.0] * len(quiet.card["calibration"]["fp_per_cm"]))
    quiet.card = dict(quiet.card, calibration=cal)
    with pytest.raises(InputError, match=f"^{MEMBERS[1]}: its calibration counted no false finding"):
        Ensemble([scorer.members[0], quiet], "max-rate")
    assert Ensemble([scorer.members[0], quiet], "max").combine == "max"  # the plain maximum still works
