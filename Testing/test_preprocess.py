"""Preprocessing: in-plane model grid and its inverse, body and lung masks, HU checks, DICOM series choice."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_dicom_series

from medanomaly.errors import InputError
from medanomaly.orientation import Reorientation
from medanomaly.preprocess import (CUT_EDGE_MM, InputSpec, ModelGrid, body_mask, model_slice_count,
                                   prepare_slices)
from medanomaly.synth import thinner_slices
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
    grid = ModelGrid(native_shape=(40, 30), resized_shape=(40, 30), offset=(-44, -49), size=128)
    x = torch.arange(40 * 30, dtype=torch.float32).reshape(1, 40, 30)
    model = grid.to_model(x, fill=-1.0)
    assert model.shape == (1, 128, 128) and (model == -1).sum() == 128 * 128 - 1200
    assert torch.equal(grid.to_native(model), x)


def test_thin_slices_are_averaged_to_the_model_slice_thickness(demo_image):
    """A CT reconstructed 4x thinner (0.5 mm) reaches the model as the 2 mm slices the model was trained on: the same
    anatomy, and noise independent between thin slices averaged down by the triangle profile (FWHM 2 mm) to
    sqrt(sum w^2) / sum w = sqrt(2.75) / 4 = 0.41 of what the model would see slice by slice."""
    spec, native = InputSpec(size=128, spacing_mm=3.5, slice_mm=2.0), InputSpec(size=128, spacing_mm=3.5)
    original = prepare_slices(*canonical(demo_image), spec)
    thin, noisy = thinner_slices(demo_image, 4), thinner_slices(demo_image, 4, noise_hu=40.0)
    averaged = prepare_slices(*canonical(thin), spec)
    assert demo_image.GetSize()[2] == 60 and thin.GetSize()[2] == 240
    assert averaged.hu.shape == original.hu.shape == (60, 128, 128)
    assert averaged.spacing_mm[0] == pytest.approx(2.0) and averaged.grid.native_slices == 240
    assert (averaged.body == original.body).mean() > 0.99
    difference = (averaged.hu - original.hu).abs().numpy()[original.body]
    assert difference.mean() < 8.0  # HU; a thick slice's profile is not exactly its linear interpolation's
    noise_averaged = (prepare_slices(*canonical(noisy), spec).hu - averaged.hu).numpy()[averaged.body].std()
    per_slice = prepare_slices(*canonical(thin), native)
    assert per_slice.hu.shape[0] == 240 and not per_slice.grid.resamples_slices
    noise_native = (prepare_slices(*canonical(noisy), native).hu - per_slice.hu).numpy()[per_slice.body].std()
    assert noise_averaged / noise_native == pytest.approx(np.sqrt(2.75) / 4, abs=0.03)


def test_model_slices_map_back_onto_native_slices_along_s():
    assert model_slice_count(100, 0.625, 2.0) == 31
    assert model_slice_count(30, 5.0, 2.0) == 30  # thick slices are never interpolated
    assert model_slice_count(141, 2.0, 2.0) == 141 and model_slice_count(451, 0.625, 0.0) == 451
    grid = ModelGrid(native_shape=(6, 6), resized_shape=(6, 6), offset=(0, 0), size=6, native_slices=20,
                     model_slices=5)
    np.testing.assert_array_equal(grid.native_slice_index(), np.arange(20) // 4)
    ramp = torch.arange(20, dtype=torch.float32)[:, None, None].expand(20, 6, 6)
    model = grid.to_model(ramp, fill=0.0)
    # the triangle profile is symmetric, so a linear ramp keeps its value at each model slice's centre (inside)
    np.testing.assert_allclose(model[1:-1, 0, 0].numpy(), (np.arange(1, 4) + 0.5) * 4 - 0.5, atol=1e-4)
    native = grid.to_native(torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 6, 6).contiguous())
    assert native.shape == (20, 6, 6)
    np.testing.assert_allclose(native[:, 3, 3].numpy(), np.clip((np.arange(20) + 0.5) / 4 - 0.5, 0, 4), atol=1e-6)


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


def test_models_on_one_grid_share_the_resampled_volume(demo_image):
    """An ensemble's members on one model grid resample the volume and find its body once; each gets what it would
    have got alone, and a member on another grid gets its own."""
    from dataclasses import replace

    hu, spacing = canonical(demo_image)
    body_spec = InputSpec(size=128, spacing_mm=3.5, region="body")
    lung_spec = replace(body_spec, window_hu=(-1024.0, 3071.0), region="lung")
    shared: dict = {}
    body, lung = prepare_slices(hu, spacing, body_spec, shared), prepare_slices(hu, spacing, lung_spec, shared)
    assert lung.hu is body.hu and lung.body is body.body and lung.region is not body.region
    assert prepare_slices(hu, spacing, body_spec, shared) is body
    for spec, got in ((body_spec, body), (lung_spec, lung)):
        alone = prepare_slices(hu, spacing, spec)
        assert torch.equal(got.hu, alone.hu) and np.array_equal(got.region, alone.region)
        assert np.array_equal(got.body, alone.body) and got.grid == alone.grid
        assert got.spacing_mm == alone.spacing_mm and got.coverage == alone.coverage
    finer = prepare_slices(hu, spacing, replace(body_spec, spacing_mm=2.5), shared)
    assert finer.hu.shape[1:] == (128, 128) and finer.spacing_mm[1] == pytest.approx(2.5, rel=0.02)
    assert len(shared) == 3


def test_smoothing_inside_the_region_is_the_normalized_gaussian_of_the_whole_grid():
    """smooth_scores filters only the region's bounding box; inside the region that is the normalized Gaussian
    computed on the whole grid, and outside it zero."""
    from scipy import ndimage as ndi

    from medanomaly.engine import smooth_scores

    rng = np.random.default_rng(3)
    scores = rng.random((30, 64, 72), dtype=np.float32)
    region = np.zeros(scores.shape, bool)
    region[4:25, 10:40, 20:70] = rng.random((21, 30, 50)) > 0.3
    spacing, sigma_mm = (2.0, 1.75, 1.75), 3.0
    sigma = [sigma_mm / s for s in spacing]
    num = ndi.gaussian_filter(scores * region, sigma, mode="constant", truncate=3.0)
    den = ndi.gaussian_filter(region.astype(np.float32), sigma, mode="constant", truncate=3.0)
    smoothed = smooth_scores(scores, region, spacing, sigma_mm)
    np.testing.assert_allclose(smoothed[region], num[region] / den[region], rtol=1e-6)
    assert not smoothed[~region].any()
    assert not smooth_scores(scores, np.zeros_like(region), spacing, sigma_mm).any()


@pytest.mark.parametrize("radius", [1, 3, 9])
def test_closing_by_distance_transforms_is_the_binary_closing_with_a_disc(radius):
    """close_in_plane gives the voxels of ndi.binary_closing with the disc yy^2 + xx^2 <= r^2, slice by slice, with
    background beyond the slice's edges (the mask here touches them), and leaves empty slices empty."""
    from scipy import ndimage as ndi

    from medanomaly.preprocess import close_in_plane

    rng = np.random.default_rng(radius)
    mask = ndi.gaussian_filter(rng.random((4, 60, 70)), (0, 3, 3)) > 0.52
    mask[2] = False
    disc = np.zeros((1, 2 * radius + 1, 2 * radius + 1), bool)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc[0] = yy**2 + xx**2 <= radius**2
    pad = ((0, 0), (radius, radius), (radius, radius))
    expected = ndi.binary_closing(np.pad(mask, pad), structure=disc)[:, radius:-radius, radius:-radius]
    closed = close_in_plane(mask, radius)
    assert mask[:, 0].any() and closed.sum() > mask.sum()
    assert np.array_equal(closed, expected) and not closed[2].any()


def test_the_pleural_lung_region_takes_in_a_nodule_on_the_pleura(demo_image):
    """A nodule on the chest wall is denser than the -400 HU lung threshold, so the lung region leaves much of it out;
    region "lung_pleura" (the lungs closed with a 15 mm rolling ball) takes it in and adds little else."""
    from medanomaly.synth import LesionInserter

    image = demo_image[:, :, 10:50]
    inserter = LesionInserter(image)
    insertion = inserter.insert("nodule_juxtapleural", seed=4, diameter_mm=16.0, shape="lobulated")
    lesioned = sitk.GetImageFromArray(insertion.volume)
    lesioned.CopyInformation(image)
    hu, spacing = canonical(lesioned)
    spec = InputSpec(size=128, spacing_mm=2.0, region="lung")
    lung = prepare_slices(hu, spacing, spec)
    pleura = prepare_slices(hu, spacing, InputSpec(size=128, spacing_mm=2.0, region="lung_pleura"))
    mask = inserter.reorientation.to_canonical(insertion.mask).astype(np.float32)
    lesion = lung.grid.to_model(torch.from_numpy(np.ascontiguousarray(mask)), 0.0).numpy() > 0.5
    assert lesion.sum() > 20
    assert lung.region[lesion].mean() < 0.8 <= pleura.region[lesion].mean()
    normal = canonical(image)
    grown = prepare_slices(*normal, InputSpec(size=128, spacing_mm=2.0, region="lung_pleura")).region.sum()
    assert grown < 1.1 * prepare_slices(*normal, spec).region.sum()


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


def test_lung_mask_leaves_out_gas_below_the_diaphragm_but_keeps_an_airy_lung(demo_image, monkeypatch):
    """A pocket of nearly pure air in soft tissue (the stomach's or colon's gas in a chest CT) is not lung: it stays
    out of the lung mask. A lung that is nearly pure air itself (severe emphysema) is still lung: the largest air
    component is never taken for gas, nor one of about its size."""
    from scipy import ndimage as ndi

    from medanomaly.preprocess import lung_mask

    hu, spacing = canonical(demo_image)
    hu = hu.astype(np.float32)
    body = body_mask(hu)
    lungs = lung_mask(hu, body, spacing)
    # the deepest point of soft tissue, far from air: a 40 mm ball of gas there (33 mL) with CT noise
    depth = ndi.distance_transform_edt(body & ~ndi.binary_dilation(hu < -400, iterations=3), sampling=spacing)
    depth[:11], depth[-11:] = 0, 0  # the whole ball inside the scan
    centre = np.unravel_index(depth.argmax(), depth.shape)
    assert depth[centre] > 25.0
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in hu.shape)]
    ball = sum(((g - c) * d) ** 2 for g, c, d in zip((zz, yy, xx), centre, spacing)) <= 20.0 ** 2
    gas = hu.copy()
    gas[ball] = -1000.0 + np.random.default_rng(0).normal(0.0, 20.0, ball.sum())
    with_gas = lung_mask(gas, body_mask(gas), spacing)
    assert not with_gas[ball].any()
    assert np.array_equal(with_gas, lungs)
    # without the gas rule the ball would be lung: large enough to count as an air component
    assert ball.sum() * np.prod(spacing) / 1000.0 > 30.0
    monkeypatch.setattr("medanomaly.preprocess.GAS_MEDIAN_HU", -2000.0)
    assert lung_mask(gas, body_mask(gas), spacing)[ball].all()
    monkeypatch.undo()
    airy = hu.copy()
    airy[lungs & (hu < -400)] = -990.0
    assert (lung_mask(airy, body_mask(airy), spacing) == lungs).mean() > 0.99


def test_dicom_folder_without_suffix_and_series_choice(small_ct, tmp_path, caplog):
    folder = tmp_path / "study"
    write_dicom_series(small_ct[:, :, :10], folder, series_uid="1.2.3.10", description="short")
    write_dicom_series(small_ct, folder, series_uid="1.2.3.24", description="full")
    write_dicom_series(small_ct[:, :, :12], folder, modality="MR", series_uid="1.2.3.99", description="mr")
    volume = read_volume(folder)
    assert volume.series_uid == "1.2.3.24" and volume.image.GetSize()[2] == 24
    assert "1.2.3.24" in caplog.text and "--series" in caplog.text
    # the choice is recorded with the result too (findings.json's warnings), so a batch shows what it left out
    assert len(volume.warnings) == 1 and "holds 3 series" in volume.warnings[0] and "the others were not" in \
        volume.warnings[0]
    chosen = read_volume(folder, series="1.2.3.10")
    assert chosen.image.GetSize()[2] == 10 and not chosen.warnings
    np.testing.assert_allclose(chosen.image.GetSpacing(), small_ct.GetSpacing(), rtol=1e-5)
    with pytest.raises(InputError, match="is MR"):
        read_volume(folder, series="1.2.3.99")
    with pytest.raises(InputError, match="no series with UID"):
        read_volume(folder, series="9.9")


def test_nifti_whose_qform_and_sform_disagree_says_which_it_used(tmp_path):
    """ITK (and so 3D Slicer) reads such a header by its sform; the outputs follow it, and the result says so, since
    a tool that takes the qform would show the findings elsewhere. A header whose two agree gets no note."""
    import nibabel as nib

    from conftest import DEMO_CT

    demo = nib.load(str(DEMO_CT))
    assert read_volume(DEMO_CT).warnings == []
    shifted = demo.affine.copy()
    shifted[:3, 3] += 20.0
    image = nib.Nifti1Image(np.asarray(demo.dataobj), demo.affine)
    image.set_qform(demo.affine, code=1)
    image.set_sform(shifted, code=1)
    path = tmp_path / "two_transforms.nii.gz"
    nib.save(image, str(path))
    volume = read_volume(path)
    ras_origin = np.array(volume.image.GetOrigin()) * [-1, -1, 1]
    np.testing.assert_allclose(ras_origin, shifted[:3, 3], atol=1e-3)  # the sform's, 20 mm from the qform's
    (note,) = volume.warnings
    assert "qform and sform place the voxels up to 34.6 mm apart" in note and "read with its sform" in note


def test_dicom_files_that_no_series_could_read_are_named(small_ct, tmp_path):
    """GDCM leaves a truncated file out of its series without a word; where it was the first or last slice, the rest
    still makes an evenly spaced stack, so only this note tells that the series is shorter than the folder."""
    folder = tmp_path / "series"
    files = write_dicom_series(small_ct[:, :, :12], folder)
    assert read_volume(folder).warnings == []
    files[0].write_bytes(files[0].read_bytes()[:300])
    files[-1].write_bytes(files[-1].read_bytes()[:-4000])
    volume = read_volume(folder)
    assert volume.image.GetSize()[2] == 10
    (note,) = volume.warnings
    assert note.startswith("2 DICOM file(s) of the folder are in no series that could be read")


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


def test_a_trunk_wider_than_the_field_of_view_is_reported(demo_image):
    """The shipped models see 448 mm around the body's centre. The demo chest is about 350 mm wide; stretched to a
    1.5x wider (larger) patient it no longer fits, and coverage() says how much lies outside and where."""
    spec = InputSpec(size=128, spacing_mm=3.5)
    fitting = prepare_slices(*canonical(demo_image), spec)
    fits, fits_region = fitting.coverage, fitting.region
    assert (fits_region == fitting.body).all()  # nothing cut, nothing left out
    assert fits["field_of_view_mm"] == 448.0
    assert fits["body_share_outside"] == 0.0 and set(fits["beyond_mm"].values()) == {0.0}
    wide = sitk.Image(demo_image)
    wide.SetSpacing((demo_image.GetSpacing()[0] * 1.5,) + demo_image.GetSpacing()[1:])  # i runs right to left
    hu, spacing = canonical(wide)
    slices = prepare_slices(hu, spacing, spec)
    body = body_mask(np.asarray(hu, np.float32))
    columns = np.nonzero(body.any(axis=(0, 1)))[0]
    width_mm = (columns[-1] + 1 - columns[0]) * spacing[2]
    cover = slices.coverage
    assert width_mm > 448
    reach = cover["beyond_mm"]
    assert reach["anterior"] == reach["posterior"] == 0.0
    # the window is centred on the body: what does not fit sticks out on both sides, about half each
    assert reach["right"] + reach["left"] == pytest.approx(width_mm - 448, abs=2 * 3.5 + 2 * spacing[2])
    assert abs(reach["right"] - reach["left"]) <= 3.5
    assert 0.005 < cover["body_share_outside"] < 0.2
    # where the window cuts through the body, a band along the cut is left out of the scored region
    band = int(np.ceil(CUT_EDGE_MM / 3.5))
    assert slices.body[:, :, :band].any() and slices.body[:, :, -band:].any()
    assert not slices.region[:, :, :band].any() and not slices.region[:, :, -band:].any()
    assert slices.region[:, :, band:-band].sum() == slices.body[:, :, band:-band].sum()


def test_the_band_along_a_cut_follows_the_cut_slices():
    """A trunk 440 mm wide (it fits the 448 mm window) with arms making slices 20-22 of 40 (2 mm) 500 mm wide: only
    there, and within CUT_EDGE_MM above and below, is the band along the left and right window edges left out."""
    hu = np.full((40, 200, 560), -1000.0, np.float32)  # 1 mm pixels
    hu[:, 40:160, 60:500] = 40.0
    hu[20:23, 90:110, 30:530] = 40.0
    slices = prepare_slices(hu, (2.0, 1.0, 1.0), InputSpec(size=128, spacing_mm=3.5))
    assert slices.coverage["beyond_mm"]["right"] > 0 and slices.coverage["beyond_mm"]["left"] > 0
    reach = int(np.ceil(CUT_EDGE_MM / 2.0))
    cols = int(np.ceil(CUT_EDGE_MM / slices.spacing_mm[2]))
    near = np.zeros(40, bool)
    near[20 - reach:23 + reach] = True
    for band in (np.s_[:, :, :cols], np.s_[:, :, -cols:]):
        body, region = slices.body[band], slices.region[band]
        assert body[near].any() and not region[near].any()
        assert (region[~near] == body[~near]).all() and region[~near].any()
    inner = np.s_[:, :, cols:-cols]
    assert (slices.region[inner] == slices.body[inner]).all()


def test_a_body_cut_off_by_the_scan_field_of_view_gets_the_band_too():
    """A scan whose own field of view truncated the patient (the body runs into the image's left and right edges,
    inside the model window): the band lies along the image's edges within the window, in every slice."""
    hu = np.full((10, 200, 300), -1000.0, np.float32)  # 1 mm pixels: a 300 mm wide image, narrower than 448 mm
    hu[:, 50:150, :] = 40.0
    slices = prepare_slices(hu, (2.0, 1.0, 1.0), InputSpec(size=128, spacing_mm=3.5))
    assert slices.coverage["body_share_outside"] == 0.0 and slices.coverage["cut_off"] == ["right", "left"]
    columns = np.nonzero(slices.body.any(axis=(0, 1)))[0]  # the image's columns inside the window
    cols = int(np.ceil(CUT_EDGE_MM / slices.spacing_mm[2]))
    examined = np.nonzero(slices.region.any(axis=(0, 1)))[0]
    assert examined[0] == columns[0] + cols and examined[-1] == columns[-1] - cols
    rows = slices.body.any(axis=(0, 2))
    assert (slices.region.any(axis=(0, 2)) == rows).all()  # anterior and posterior are not cut
