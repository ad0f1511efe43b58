"""Outputs lie on the input's voxel grid bit for bit, whatever the orientation, and the canonical reorientation makes
the result independent of how the same CT is stored."""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import denser_tissue, reoriented

import medanomaly
from medanomaly.api import detect_volume
from medanomaly.orientation import Reorientation
from medanomaly.preprocess import CUT_EDGE_MM
from medanomaly.synth import thinner_slices
from medanomaly.volumes import volume_from_image

KINDS = ["lps", "ras", "flipped_z", "sagittal", "coronal", "oblique"]


def geometry(image: sitk.Image):
    return (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


@pytest.fixture(scope="module")
def results(small_ct, default_model, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("geometry")
    for kind in KINDS:
        image, perm, flips = reoriented(small_ct, kind)
        suffix = ".nii.gz" if kind in ("ras", "oblique") else ".nrrd"
        path = root / f"ct_{kind}{suffix}"
        sitk.WriteImage(image, str(path))
        (result,) = medanomaly.detect(path, root / "out", model=str(default_model), mood=True, sensitivity=1.0)
        out[kind] = (sitk.ReadImage(str(path)), result, perm, flips)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_on_the_input_grid(results, kind):
    reference, result, _, _ = results[kind]
    case = result.output_dir
    for name in ("heatmap.nrrd", "labels.nrrd", "reconstruction.nrrd"):
        written = sitk.ReadImage(str(case / name))
        if kind == "oblique":
            # NRRD stores direction x spacing; a reader recovers the spacing as a vector norm, so an oblique grid
            # comes back within the last bits of a double (the written image itself copies the input's geometry).
            assert written.GetSize() == reference.GetSize()
            for got, want in zip(geometry(written)[1:], geometry(reference)[1:]):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert geometry(written) == geometry(reference), name
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "heatmap.nrrd")))
    assert heat.dtype == np.float32 and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    mood = sitk.ReadImage(str(result.files["mood"]["pixel"]))
    assert geometry(mood)[0] == reference.GetSize()
    np.testing.assert_allclose(mood.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    seg = slicerio.read_segmentation(str(case / "anomalies.seg.nrrd"))
    expected = np.eye(4)
    expected[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    expected[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-9)
    assert seg["voxels"].shape == reference.GetSize()


@pytest.mark.parametrize("kind", ["ras", "flipped_z", "sagittal", "coronal"])
def test_same_anatomy_same_result_in_any_storage_order(results, kind):
    _, base, _, _ = results["lps"]
    _, result, perm, flips = results[kind]
    expected = np.transpose(base.heatmap, perm)
    for axis, flip in enumerate(flips):
        if flip:
            expected = np.flip(expected, axis)
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    recon = np.transpose(base.reconstruction, perm)  # the pseudo-healthy CT, integer HU: equal to the last bit
    for axis, flip in enumerate(flips):
        if flip:
            recon = np.flip(recon, axis)
    np.testing.assert_array_equal(result.reconstruction, recon)
    assert len(result.findings) == len(base.findings)
    assert result.volume_score == pytest.approx(base.volume_score, abs=1e-6)
    for f, g in zip(result.findings, base.findings):
        np.testing.assert_allclose(f["centroid_lps_mm"], g["centroid_lps_mm"], atol=0.02)
        assert f["volume_mm3"] == pytest.approx(g["volume_mm3"])


def test_reconstruction_changes_the_body_only(results):
    """The pseudo-healthy CT is the input plus the model's rounded change inside the body: int16, unchanged in the air
    around the patient, changed in part of the body."""
    reference, result, _, _ = results["lps"]
    recon, hu = result.reconstruction, sitk.GetArrayFromImage(reference)
    assert recon.dtype == np.int16 and recon.shape == hu.shape
    air = hu < -900
    air[:, 8:-8, 8:-8] = False  # the image's rim: air, well away from the body
    assert air.any() and (recon[air] == hu[air]).all()
    changed = recon != hu
    assert 0.05 < changed.mean() < 0.9 and (np.abs(recon.astype(int) - hu)[changed] <= 1500).all()


def test_canonical_orientation_is_superior_posterior_left():
    # RAS-stored image: i runs to the patient's right (-x in LPS), j anterior (-y)
    r = Reorientation.from_geometry((-1, 0, 0, 0, -1, 0, 0, 0, 1), (0.5, 0.7, 2.0))
    assert r.flips == (False, True, True)
    assert r.canonical_spacing == (2.0, 0.7, 0.5)
    array = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(r.to_input(r.to_canonical(array)), array)
    # sagittal stack: k along x
    d = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # columns: i -> P, j -> -S, k -> L
    s = Reorientation.from_geometry(d.ravel(), (0.8, 0.9, 3.0))
    assert s.canonical_spacing == (0.9, 0.8, 3.0)
    assert np.array_equal(s.to_input(s.to_canonical(array)), array)
    canonical = s.to_canonical(array)
    index = np.array([1, 2, 3])
    assert canonical[tuple(s.canonical_index(index, canonical.shape).astype(int))] == array[tuple(index)]


def test_written_images_copy_the_input_geometry_exactly(results):
    from medanomaly.outputs import image_like

    reference, result, _, _ = results["oblique"]
    assert geometry(image_like(result.heatmap, result.volume.image)) == geometry(reference)


def test_nrrd_header_is_slicer_readable(results):
    _, result, _, _ = results["oblique"]
    _, header = nrrd.read(str(result.output_dir / "heatmap.nrrd"))
    assert header["space"] == "left-posterior-superior"


def test_reference_check_names_the_same_slices_in_any_storage_order(small_ct, default_model):
    """The reference check's slice ranges are superior-inferior positions in mm, so the same CT stored axially,
    flipped, sagittally or coronally reports the same ones. Here its inferior half reads 250 HU denser."""
    image = denser_tissue(small_ct, slices=slice(0, 12))
    z = [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(image.GetDepth())]
    checks = {kind: detect_volume(volume_from_image(reoriented(image, kind)[0], name=kind), str(default_model),
                                  device="cpu").reference_check for kind in ("lps", "flipped_z", "sagittal", "coronal")}
    base = checks["lps"]
    assert base["slices_unlike"] > 0
    for lo, hi in base["unlike_s_mm"]:  # only slices of the denser half
        assert min(z[:12]) - 0.01 <= lo <= hi <= max(z[:12]) + 0.01
    for kind, check in checks.items():
        assert check["unlike_s_mm"] == base["unlike_s_mm"], kind
        assert check["slices_unlike"] == base["slices_unlike"] and check["slices_checked"] == base["slices_checked"]
        assert check["max_ratio"] == pytest.approx(base["max_ratio"], abs=2e-3)


def test_thin_slices_run_at_the_model_thickness_and_come_back_on_the_input_grid(small_ct, default_model, tmp_path):
    """The same CT at 0.5 mm slices (4x thinner): the model scores 2 mm slices, as it was trained, and every output
    lies on the thin input grid; the heatmap and the strongest finding agree with those of the 2 mm original."""
    thin = thinner_slices(small_ct, 4)
    path = tmp_path / "thin.nrrd"
    sitk.WriteImage(thin, str(path))
    (result,) = medanomaly.detect(path, tmp_path / "out", model=str(default_model), sensitivity=1.0)
    base = detect_volume(volume_from_image(small_ct), str(default_model), sensitivity=1.0)
    assert result.settings["model_slices"] == small_ct.GetSize()[2] == base.settings["model_slices"]
    assert result.settings["model_slice_spacing_mm"] == pytest.approx(2.0)
    for name in ("heatmap.nrrd", "significance.nrrd", "labels.nrrd", "reconstruction.nrrd"):
        assert geometry(sitk.ReadImage(str(result.output_dir / name))) == geometry(thin), name
    assert result.reference_check["slices_checked"] == thin.GetSize()[2]
    expected = np.repeat(base.significance, 4, axis=0)  # each 2 mm slice covers 4 thin ones
    assert np.corrcoef(expected.ravel(), result.significance.ravel())[0, 1] > 0.98
    assert result.findings and base.findings
    np.testing.assert_allclose(result.findings[0]["centroid_lps_mm"], base.findings[0]["centroid_lps_mm"], atol=3.0)


def test_body_outside_the_field_of_view_is_recorded_and_warned(small_ct, small_ct_file, default_model, tmp_path):
    """The real chest CT fits the model's 448 mm field of view; the same CT as a 1.5x wider patient does not, and
    findings.json, the warnings and the log say how much of the body was left out; the heatmap is zero there."""
    wide = sitk.Image(small_ct)
    wide.SetSpacing((small_ct.GetSpacing()[0] * 1.5,) + small_ct.GetSpacing()[1:])
    path = tmp_path / "wide.nrrd"
    sitk.WriteImage(wide, str(path))
    (fits,) = medanomaly.detect(small_ct_file, tmp_path / "out", model=str(default_model))
    (result,) = medanomaly.detect(path, tmp_path / "out", model=str(default_model))
    assert fits.coverage["body_share_outside"] == 0.0 and not any("field of view" in w for w in fits.warnings)
    summary = json.loads((result.output_dir / "findings.json").read_text())
    record = summary["coverage"]
    assert record == result.coverage and record["field_of_view_mm"] == 448.0
    assert record["body_share_outside"] > 0.001
    assert record["beyond_mm"]["right"] > 0 and record["beyond_mm"]["left"] > 0
    (warning,) = [w for w in summary["warnings"] if "field of view" in w]
    assert warning.startswith(f"{record['body_share_outside'] * 100:.1f}% of the body lies outside the model's 448 mm")
    # nothing is scored outside the window, nor in the band along its edges where it cuts through the body (the body
    # ends abruptly in air there, which the model would report: 3 of 4 findings at sensitivity 0.5 before the band)
    heat = result.significance  # [k, j, i]; i runs right to left in this CT
    columns = np.nonzero(heat.max(axis=(0, 1)) > 0)[0]
    assert (columns[-1] + 1 - columns[0]) * wide.GetSpacing()[0] <= 448.0 - 2 * CUT_EDGE_MM + 2 * wide.GetSpacing()[0]


def test_slices_much_thicker_than_the_models_are_warned_about(small_ct, default_model):
    """Thick slices cannot be made thin: 4 mm slices (2x the model's 2 mm) run without a word, 6 mm slices (3x) with
    a warning; both give outputs on their own grid."""
    quiet, warned = (detect_volume(volume_from_image(sitk.BinShrink(small_ct, [1, 1, f])), str(default_model))
                     for f in (2, 3))
    assert quiet.significance.shape == (12, 128, 128) and warned.significance.shape == (8, 128, 128)
    assert not any("mm the model learned from" in w for w in quiet.warnings)
    (warning,) = [w for w in warned.warnings if "mm the model learned from" in w]
    assert warning.startswith("its slices are 6 mm apart, 3.0x the 2 mm the model learned from")
    assert warned.settings["model_slices"] == 8


def test_a_minimum_size_below_the_calibrations_is_warned_about(small_ct, default_model):
    """--min-size-mm3 below the card's calibrated minimum keeps findings the false-finding curve never counted: a
    warning says the p-values are then too small; the card's minimum or a larger one runs without it."""
    volume = volume_from_image(small_ct)
    calibrated = json.loads((default_model / "model_card.json").read_text())["calibration"]["min_size_mm3"]
    results = {size: detect_volume(volume, str(default_model), min_size_mm3=size)
               for size in (None, calibrated * 2, calibrated / 4)}
    marker = "were calibrated on findings of at least"
    assert not any(marker in w for r in (results[None], results[calibrated * 2]) for w in r.warnings)
    (warning,) = [w for w in results[calibrated / 4].warnings if marker in w]
    assert warning.startswith(f"findings down to {calibrated / 4:g} mm3 are kept") and f"{calibrated:g} mm3" in warning
    assert results[calibrated / 4].settings["min_size_mm3"] == calibrated / 4
