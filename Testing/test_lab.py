"""The anomaly lab: lesion insertion in real CT (ranges, exact masks, seeds, anatomy) and the evaluation run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ROOT

from medanomaly.bundle import ModelBundle, resolve_model
from medanomaly.errors import InputError
from medanomaly.lab import (TARGET_SUBSETS, build_cases, evaluate, intervals, markdown_breakdown, markdown_table,
                            record_in_card, slab)
from medanomaly.metrics import proportion_interval, roc_auc
from medanomaly.synth import LESION_KINDS, LUNG_KINDS, LesionInserter, insert_lesions


@pytest.fixture(scope="module")
def inserter(demo_image):
    return LesionInserter(demo_image[:, :, 10:50])


@pytest.fixture(scope="module")
def insertions(inserter):
    return {kind: inserter.insert(kind, seed=11) for kind in LESION_KINDS}


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_mask_is_exactly_where_the_volume_changed(inserter, insertions, kind):
    insertion = insertions[kind]
    assert insertion.mask.any(), f"{kind} changed nothing"
    assert np.array_equal(insertion.mask, insertion.volume != inserter.original)
    assert insertion.volume.dtype == inserter.original.dtype
    assert insertion.record["changed_voxels"] == int(insertion.mask.sum())


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_lesions_stay_inside_their_anatomy(inserter, insertions, kind):
    mask = inserter.reorientation.to_canonical(insertions[kind].mask)
    anatomy = inserter.lung if kind in LUNG_KINDS else inserter.body
    assert not (mask & ~anatomy).any(), f"{kind} leaves its anatomy"


def test_inserted_hu_in_range(inserter, insertions):
    noise = 6 * inserter.noise_hu
    original = inserter.original
    for kind in ("nodule_solid", "consolidation", "effusion", "ascites"):
        r = insertions[kind]
        new = r.volume[r.mask].astype(float)
        assert new.max() <= r.record["hu"] + noise + 1, kind  # blended towards the target, never beyond
        assert new.min() >= original[r.mask].min() - noise - 1, kind
    ggo = insertions["ggo"]
    core = ggo.volume[ggo.mask].astype(float)
    assert core.max() <= max(ggo.record["hu"] + noise, original[ggo.mask].max()) + 1
    for kind in ("effusion", "ascites"):
        r = insertions[kind]
        assert 0 <= r.record["hu"] <= 20
    needle = insertions["needle"]
    assert 2000 <= needle.record["hu"] <= 3000
    assert 1.0 <= needle.record["diameter_mm"] <= 2.0
    assert needle.volume[needle.mask].max() > 700, "the needle core stands out even after partial-volume blur"
    assert needle.volume.max() <= 3000
    assert -700 <= insertions["ggo"].record["hu"] <= -300
    assert 0 <= insertions["consolidation"].record["hu"] <= 50
    assert 3 <= insertions["nodule_solid"].record["diameter_mm"] <= 30


def test_nodule_diameter_and_shape_parameters(inserter):
    r = inserter.insert("nodule_solid", seed=3, diameter_mm=10.0, shape="lobulated", hu=40.0)
    volume = r.record["volume_mm3"]
    sphere = 4 / 3 * np.pi * 5.0**3
    assert 0.5 * sphere < volume < 3.0 * sphere
    assert r.record["shape"] == "lobulated" and r.record["hu"] == 40.0


def test_seed_reproduces_a_case(inserter):
    a = inserter.insert("nodule_part_solid", seed=99)
    b = inserter.insert("nodule_part_solid", seed=99)
    c = inserter.insert("nodule_part_solid", seed=100)
    assert np.array_equal(a.volume, b.volume) and a.record == b.record
    assert not np.array_equal(a.volume, c.volume)


def test_no_lesion_leaves_volume_unchanged(demo_image):
    image, labels, records = insert_lesions(demo_image[:, :, :12], [], seed=1)
    assert records == [] and not labels.any()
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(demo_image[:, :, :12]))


def test_several_lesions_label_map(demo_image):
    image, labels, records = insert_lesions(demo_image[:, :, 10:40], ["nodule_solid", "mood_noise"], seed=5)
    assert [r["label"] for r in records] == [1, 2]
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 2).any()
    changed = sitk.GetArrayFromImage(image) != sitk.GetArrayFromImage(demo_image[:, :, 10:40])
    assert np.array_equal(changed, labels > 0)


def test_slab_follows_canonical_superior_order(demo_image):
    flipped = sitk.Flip(demo_image, [False, False, True])
    a = sitk.GetArrayFromImage(slab(demo_image, 5, 9))
    b = sitk.GetArrayFromImage(slab(flipped, 5, 9))
    assert np.array_equal(a, b[::-1])


def test_evaluate_runs_every_metric_and_prints_tables(demo_image, tmp_path):
    source = tmp_path / "source.nii.gz"
    sitk.WriteImage(sitk.Shrink(demo_image, [2, 2, 1]), str(source))
    manifest = build_cases(source, [(4, 24), (34, 54)], ["nodule_solid:12", "needle", "mood_intensity"],
                           tmp_path / "cases", seed=1, name="demo")
    assert len(manifest["cases"]) == 8 and sum(c["normal"] for c in manifest["cases"]) == 2
    results = []
    for model in ("chest-ct-vqvae-recon", "chest-ct-hu-outlier"):
        r = evaluate(tmp_path / "cases", model)
        for key in ("volume_auroc", "volume_ap", "voxel_ap", "voxel_auroc", "dice_best", "localization_rate",
                    "fp_findings_per_normal_volume", "seconds_per_volume_median", "peak_rss_mb"):
            assert np.isfinite(r[key]), key
        assert 0 <= r["voxel_ap"] <= 1 and 0 <= r["volume_auroc"] <= 1
        assert set(r["froc"]) == {"0.5", "1.0", "2.0", "4.0"}
        findings = [r["findings_froc"][rate] for rate in ("0.5", "1.0", "2.0", "4.0")]
        assert all(0 <= a <= b <= 1 for a, b in zip(findings, findings[1:]))  # more false findings allowed, no fewer hits
        assert r["target_sensitivity_at_2fp_findings"]["needles"]["lesions"] == 2
        assert set(r["per_kind"]) == {"nodule_solid", "needle", "mood_intensity"}
        # which model flagged what: a single model flags every lesion it finds and every false finding
        for kind in r["per_kind"].values():
            found = round(kind["sensitivity_at_default"] * kind["lesions"])
            assert kind["flagged_by_at_default"] == ({model: found} if found else {})
        false = round(r["fp_findings_per_normal_volume"] * r["normal_cases"])
        assert r["fp_findings_flagged_by"] == ({model: false} if false else {})
        assert r["provenance"]["sources"][0]["sha256"]
        # the flagship's target subsets: nodules of at least 6 mm (here the 12 mm ones) and needles, at 2 FP
        target = r["target_sensitivity_at_2fp"]
        assert target["nodules >= 6 mm"]["lesions"] == 2 and target["needles"]["lesions"] == 2
        assert target["nodules >= 6 mm"]["sensitivity"] == r["per_kind"]["nodule_solid"]["sensitivity_at_2fp"]
        assert target["needles"]["sensitivity"] == r["per_kind"]["needle"]["sensitivity_at_2fp"]
        # each lesion's record: the sensitivities at 2 FP count exactly the ones marked found
        table = r["lesions_at_2fp"]["lesions"]
        assert len(table) == 6 and {lesion["case"] for lesion in table} == {c["case"] for c in manifest["cases"]
                                                                            if not c["normal"]}
        for name, subset in TARGET_SUBSETS.items():
            found = [lesion["found"] for lesion in table if subset(lesion)]
            assert np.mean(found) == pytest.approx(target[name]["sensitivity"])
        assert np.mean([lesion["found"] for lesion in table]) == pytest.approx(r["froc"]["2.0"])
        # 95% intervals: the slab AUROC's from the case scores, each sensitivity's from its lesion count
        ci = r["intervals_95"]
        assert ci["volume_auroc"][0] <= r["volume_auroc"] <= ci["volume_auroc"][1]
        for name, t in target.items():
            low, high = ci["target_sensitivity_at_2fp"][name]
            assert (low, high) == proportion_interval(round(t["sensitivity"] * 2), 2)
        assert ci["froc_at_2fp"] == proportion_interval(round(r["froc"]["2.0"] * 6), 6)
        assert json.dumps(intervals(json.loads(json.dumps(r)))) == json.dumps(ci)  # stored results too
        before_p_values = json.loads(json.dumps(r))  # stored by versions that ranked slabs by the volume score
        for c in before_p_values["case_scores"]:
            del c["volume_p_value"]
        old_auroc = roc_auc([c["volume_score"] for c in before_p_values["case_scores"]],
                            [not c["normal"] for c in before_p_values["case_scores"]])
        low, high = intervals(before_p_values)["volume_auroc"]
        assert low <= old_auroc <= high
        results.append(r)
    # an ensemble's tallies name its members
    members = ["chest-ct-vqvae-recon", "chest-ct-hu-outlier"]
    ensemble = evaluate(tmp_path / "cases", "ensemble-max-rate:" + ",".join(members))
    assert set(ensemble["fp_findings_flagged_by"]) <= set(members)
    assert sum(ensemble["fp_findings_flagged_by"].values()) == round(ensemble["fp_findings_per_normal_volume"] * 2)
    for kind in ensemble["per_kind"].values():
        assert set(kind["flagged_by_at_default"]) <= set(members)
        assert max(kind["flagged_by_at_default"].values(), default=0) <= round(kind["sensitivity_at_default"] * 2)
    table = markdown_table(results)
    assert "chest-ct-vqvae-recon" in table and "chest-ct-hu-outlier" in table
    # the numbers go into a copy of the bundle's card; weights and checksums are untouched
    copy = tmp_path / "hu-outlier-copy"
    shutil.copytree(resolve_model("chest-ct-hu-outlier").path, copy)
    record_in_card(copy, results[1])
    card = ModelBundle.load(copy).card
    assert card["evaluation"]["lab"]["voxel_ap"] == results[1]["voxel_ap"]
    assert card["evaluation"]["lab"]["findings_froc"] == results[1]["findings_froc"]
    assert card["evaluation"]["lab"]["intervals_95"]["volume_auroc"] == list(results[1]["intervals_95"]["volume_auroc"])
    assert card["evaluation"]["lab"]["cases_manifest_sha256"] == results[1]["provenance"]["manifest_sha256"]
    ModelBundle.load(copy).verify()
    with pytest.raises(InputError):
        record_in_card(copy, results[0])  # another model's numbers
    assert "needle" in markdown_breakdown(results)
    json.dumps(results)


def test_target_subsets_take_nodules_from_6_mm_and_needles():
    nodules = TARGET_SUBSETS["nodules >= 6 mm"]
    assert nodules({"kind": "nodule_part_solid", "diameter_mm": 6.0})
    assert not nodules({"kind": "nodule_solid", "diameter_mm": 4.0})
    assert not nodules({"kind": "ggo", "diameter_mm": 30.0})
    assert TARGET_SUBSETS["needles"]({"kind": "needle", "diameter_mm": 2.5})


def test_evaluate_command_line(demo_image, tmp_path, capsys):
    from medanomaly.cli import main

    source = tmp_path / "source.nii.gz"
    sitk.WriteImage(sitk.Shrink(demo_image, [2, 2, 1])[:, :, :20], str(source))
    build_cases(source, [(0, 20)], ["mood_noise"], tmp_path / "cases", seed=2)
    out = tmp_path / "result.json"
    assert main(["evaluate", "--cases", str(tmp_path / "cases"), "--model", "chest-ct-hu-outlier",
                 "--json", str(out)]) == 0
    assert "| chest-ct-hu-outlier |" in capsys.readouterr().out
    assert json.loads(out.read_text())["model"]["name"] == "chest-ct-hu-outlier"
    assert (ROOT / "scripts" / "benchmark_lab.py").is_file()
    # one group only: nothing outside it to calibrate on, so auto keeps the card and cross says what to do
    assert json.loads(out.read_text())["calibration"] == "model card"
    assert main(["evaluate", "--cases", str(tmp_path / "cases"), "--model", "chest-ct-hu-outlier",
                 "--calibration", "cross"]) == 2
    assert "--calibration card" in capsys.readouterr().err


def test_cross_calibration_uses_only_the_other_groups_normal_cases(demo_image, tmp_path):
    from medanomaly.calibration import Calibration
    from medanomaly.engine import score_slices
    from medanomaly.ensemble import Ensemble, load_scorer
    from medanomaly.lab import cross_calibrated
    from medanomaly.orientation import Reorientation
    from medanomaly.preprocess import prepare_slices
    from medanomaly.volumes import read_volume

    source = tmp_path / "source.nii.gz"
    sitk.WriteImage(sitk.Shrink(demo_image, [2, 2, 1]), str(source))
    manifest = build_cases(source, [(4, 20), (34, 54)], ["mood_intensity"], tmp_path / "cases", seed=3, name="demo")
    cases = manifest["cases"]
    scorer = load_scorer("chest-ct-hu-outlier")
    own = json.dumps(scorer.card["calibration"])
    by_group = cross_calibrated(scorer, tmp_path / "cases", cases)
    normals = {c["group"]: c for c in cases if c["normal"]}
    assert set(by_group) == set(normals) and len(normals) == 2
    for group, recalibrated in by_group.items():
        other = next(c for g, c in normals.items() if g != group)
        volume = read_volume(tmp_path / "cases" / other["volume"])
        r = Reorientation.for_image(volume.image)
        slices = prepare_slices(r.to_canonical(volume.hu), r.canonical_spacing, scorer.spec)
        smoothed, _, _ = score_slices(scorer, slices, device=torch.device("cpu"))
        expected = Calibration.fit([(smoothed, slices.region, slices.spacing_mm)])
        cal = recalibrated.card["calibration"]
        assert np.allclose(cal["voxel_quantiles"], expected.voxel_quantiles)
        assert cal["reference_slices"] == volume.hu.shape[0] and group in cal["source"]
        assert recalibrated.state_dict().keys() == scorer.state_dict().keys()  # the same network, shared
    assert json.dumps(scorer.card["calibration"]) == own  # the loaded model is left as it was
    ensemble = cross_calibrated(Ensemble([scorer, load_scorer("chest-ct-vqvae-recon")], "max"), tmp_path / "cases",
                                cases)
    for group, recalibrated in ensemble.items():
        assert isinstance(recalibrated, Ensemble) and recalibrated.combine == "max"
        assert recalibrated.members[0].card["calibration"] == by_group[group].card["calibration"]
    # the experiments' iterator: every case in order, its volume, the scorer recalibrated for its group
    from medanomaly.lab import cross_calibrated_cases

    seen = list(cross_calibrated_cases(tmp_path / "cases", "chest-ct-hu-outlier"))
    assert [c["case"] for c, _, _ in seen] == [c["case"] for c in cases]
    for case, volume, recalibrated in seen:
        assert volume.hu.shape == read_volume(tmp_path / "cases" / case["volume"]).hu.shape
        assert recalibrated.card["calibration"] == by_group[case["group"]].card["calibration"]
    result = evaluate(tmp_path / "cases", scorer, calibration="cross")
    assert result["calibration"].startswith("cross-group")
    assert [c["case"] for c in result["case_scores"]] == [c["case"] for c in cases]
    assert evaluate(tmp_path / "cases", scorer, calibration="card")["calibration"] == "model card"
    # an experiment's own calibration: per group scorers as given, and more normal references for chosen members
    given = evaluate(tmp_path / "cases", scorer, scorers=by_group, calibration_note="the experiment's")
    assert given["calibration"] == "the experiment's" and given["case_scores"] == result["case_scores"]
    extra = (smoothed[:8], slices.region[:8], slices.spacing_mm)
    widened = cross_calibrated(Ensemble([scorer, load_scorer("chest-ct-vqvae-recon")], "max"), tmp_path / "cases",
                               cases, extra_references={0: [extra]})
    for group, recalibrated in widened.items():
        cal = recalibrated.members[0].card["calibration"]
        assert cal["reference_slabs"] == 2 and cal["reference_slices"] == by_group[group].card["calibration"][
            "reference_slices"] + 8 and "1 more normal slab(s)" in cal["source"]
        assert recalibrated.members[1].card["calibration"] == ensemble[group].members[1].card["calibration"]
