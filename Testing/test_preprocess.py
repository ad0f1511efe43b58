"""Preprocessing: in-plane model grid and its inverse, body and lung masks, HU checks, DICOM series choice."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_dicom_series

from medanomaly.errors import InputError
from medanomaly.orientation import Reorientation
from medanomaly.preprocess import InPlaneGrid, InputSpec, body_mask, prepare_slices
from medanomaly.volumes import read_volume


def canonical(image):
    r = Reorientation.for_image(image)
    return r.to_canonical(sitk.GetArrayViewFromImage(image)), r.canonical_spacing


def test_model_grid_round_trip_keeps_geometry(demo_image):
    hu, spacing = canonical(demo_image)
    spec = InputSpec(size=128, spacing_mm=3.5)
    slices = prepare_slices(hu, spacing, spec)
    assert slices.hu.shape == (hu.shape[0], 128, 128)
    assert slices.spacing_mm[1] == pytest.approx(3.5, rel=0.02)
    # a smooth map survives model grid -> native grid
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    native = slices.grid.to_native((yy + xx)[None].repeat(2, 1, 1))
    assert native.shape == (2,) + hu.shape[1:]


def test_grid_handles_volumes_smaller_than_the_model_window():
    grid = InPlaneGrid(native_shape=(40, 30), resized_shape=(40, 30), offset=(-44, -49), size=128)
    x = torch.arange(40 * 30, dtype=torch.float32).reshape(1, 40, 30)
    model = grid.to_model(x, fill=-1.0)
    assert model.shape == (1, 128, 128) and (model == -1).sum() == 128 * 128 - 1200
    assert torch.equal(grid.to_native(model), x)


def test_body_excludes_couch_and_air(demo_image):
    hu, _ = canonical(demo_image)
    hu = np.asarray(hu, np.float32)
    body = body_mask(hu)
    assert 0.15 < body.mean() < 0.7
    outside_air = (hu < -900) & ~body
    assert outside_air.mean() > 0.2
    # the couch lines lie below the patient (posterior: high row index) and must not be body
    z = body.shape[0] // 2
    body_rows = np.nonzero(body[z].any(axis=1))[0]
    dense_rows = np.nonzero((hu[z] > -300).any(axis=1))[0]
    couch_rows = dense_rows[dense_rows > body_rows.max()]
    assert couch_rows.size >= 5, "the demo CT shows the couch under the patient"


def test_lung_mask_finds_two_lungs(demo_image):
    hu, spacing = canonical(demo_image)
    slices = prepare_slices(hu, spacing, InputSpec(region="lung"))
    lungs = slices.region
    assert lungs.any()
    assert (lungs & ~slices.body).sum() == 0
    from scipy import ndimage as ndi

    z = lungs.shape[0] // 2
    _, n = ndi.label(lungs[z])
    assert 1 <= n <= 3
    mean_hu = slices.hu.numpy()[lungs].mean()
    assert -950 < mean_hu < -600


def test_dicom_folder_without_suffix_and_series_choice(small_ct, tmp_path, caplog):
    folder = tmp_path / "study"
    write_dicom_series(small_ct[:, :, :10], folder, series_uid="1.2.3.10", description="short")
    write_dicom_series(small_ct, folder, series_uid="1.2.3.24", description="full")
    write_dicom_series(small_ct[:, :, :12], folder, modality="MR", series_uid="1.2.3.99", description="mr")
    volume = read_volume(folder)
    assert volume.series_uid == "1.2.3.24" and volume.image.GetSize()[2] == 24
    assert "1.2.3.24" in caplog.text and "--series" in caplog.text
    chosen = read_volume(folder, series="1.2.3.10")
    assert chosen.image.GetSize()[2] == 10
    np.testing.assert_allclose(chosen.image.GetSpacing(), small_ct.GetSpacing(), rtol=1e-5)
    with pytest.raises(InputError, match="is MR"):
        read_volume(folder, series="1.2.3.99")
    with pytest.raises(InputError, match="no series with UID"):
        read_volume(folder, series="9.9")


def test_hu_check_accepts_real_ct(demo_image, tmp_path):
    path = tmp_path / "ct.mha"
    sitk.WriteImage(demo_image, str(path))
    assert read_volume(path).warnings == []


def test_line_means_keep_a_thin_line_that_isotropic_smoothing_erases():
    from medanomaly.engine import line_kernels, line_scores, smooth_scores

    spacing = (2.5, 1.75, 1.75)
    kernels = line_kernels(spacing[1:], 4.0)
    assert kernels.shape[0] == 8 and torch.allclose(kernels.sum((1, 2, 3)), torch.ones(8))
    rng = np.random.default_rng(0)
    scores = (rng.random((20, 96, 96)) < 0.01).astype(np.float32) * 0.3  # isolated speckle, 1% of voxels
    scores[10, 40, 20:70] = 0.25  # a one-pixel line, 87 mm long, in-plane
    steps = np.arange(30)
    scores[12, 50 + steps, 30 + steps // 2] = 0.25  # an oblique one (about 27 degrees)
    region = np.ones(scores.shape, bool)
    region[:, :, :8] = False  # scores outside the region never count
    line = line_scores(scores, region, spacing, 4.0)
    iso = smooth_scores(scores, region, spacing, 3.0)
    speckle = line[:8].max()  # slices without a line
    assert line[10, 40, 30:60].min() > 0.75 * 0.25 > speckle  # the horizontal line keeps most of its value
    assert line[12, 65, 37] > speckle
    assert iso[10, 40, 45] < 0.05  # the 3D Gaussian spreads it below the speckle's line means
    assert (line[:, :, :8] == 0).all()
    # isolated speckle: a line mean is the mean over a line, never above the largest score on it
    assert line.max() <= scores.max() + 1e-6
