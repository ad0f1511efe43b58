"""The 3D shape outlier: Hessian blobness across context slices, scaled by normal statistics per tissue class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medanomaly.api import detect_volume
from medanomaly.bundle import ModelBundle
from medanomaly.detectors.hu_outlier import local_mean
from medanomaly.detectors.shape_outlier import (ShapeOutlierDetector, blobness, correlate_channels, eigenvalues,
                                                gaussian_kernels, maximum_filter)
from medanomaly.errors import ModelError
from medanomaly.preprocess import with_context
from medanomaly.synth import LesionInserter
from medanomaly.training import train
from medanomaly.volumes import volume_from_image


@pytest.mark.parametrize("sigma, half", [(2.0, 3), (4.0, 3), (1.5, 6)])
def test_derivative_kernels_are_exact_on_quadratics_even_when_truncated(sigma, half):
    x = torch.arange(-half, half + 1) * 2.0
    g, g1, g2 = gaussian_kernels(x, sigma).double()
    x = x.double()
    for f, value, slope, curvature in ((torch.ones_like(x), 1.0, 0.0, 0.0), (x, 0.0, 1.0, 0.0),
                                       (x * x / 2, None, 0.0, 1.0)):
        if value is not None:
            assert float((g * f).sum()) == pytest.approx(value, abs=1e-6)
        assert float((g1 * f).sum()) == pytest.approx(slope, abs=1e-6)
        assert float((g2 * f).sum()) == pytest.approx(curvature, abs=1e-6)


def test_closed_form_eigenvalues_match_lapack():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, 3, generator=generator) * 50
    a = a + a.transpose(-1, -2)
    a[:10] = torch.diag_embed(torch.tensor([-3.0, -3.0, -3.0])) * torch.arange(10.0)[:, None, None]  # repeated
    reference = torch.linalg.eigvalsh(a.double()).flip(-1)  # largest first
    closed = torch.stack(eigenvalues(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]), -1)
    assert float((closed.double() - reference).abs().max()) < 1e-4 * float(a.abs().max())


def test_fast_filters_equal_torch_pooling_and_grouped_convolution():
    """The shifted-operation filters that the outliers use for speed give what torch's own operators give."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 6, 37, 41, generator=generator) * 100
    kernels = torch.randn(6, 9, generator=generator)
    along_p = F.conv2d(image, kernels[:, None, :, None], groups=6)
    along_l = F.conv2d(image, kernels[:, None, None, :], groups=6)
    assert torch.allclose(correlate_channels(image, kernels, dim=2), along_p, rtol=1e-5, atol=1e-3)
    assert torch.allclose(correlate_channels(image, kernels, dim=3), along_l, rtol=1e-5, atol=1e-3)
    for radius in (0, 1, 4, 30):  # 30: wider than the image
        width = 2 * radius + 1
        pooled = F.max_pool2d(F.pad(image, (radius,) * 4, value=-float("inf")), width, stride=1)
        assert torch.equal(maximum_filter(image, radius), pooled)
    for width in (1, 4, 21):  # made odd: 1, 5, 21
        odd = width | 1
        square = F.avg_pool2d(image, odd, stride=1, padding=odd // 2, count_include_pad=False)
        assert torch.allclose(local_mean(image, width), square, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["chest-ct-shape-outlier", "chest-ct-tube-outlier"])
def test_scoring_on_the_region_box_gives_the_whole_image_values(name):
    """score() computes only the region's bounding box widened by the filters' reach (reach_px): inside the region
    that is what the whole image gives, to the bit, and zero outside it."""
    from medanomaly.bundle import resolve_model
    from medanomaly.detectors import build_detector

    detector = build_detector(resolve_model(name))
    detector.slice_spacing_mm = 2.0
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, detector.spec.channels, 128, 120, generator=generator)
    region = torch.zeros(3, 1, 128, 120, dtype=torch.bool)
    region[:, :, 40:90, 30:70] = True
    region[1, :, 20:25, 60:64] = True
    with torch.inference_mode():
        cropped = detector.score(image, region).score
        classes, blob = detector.features(image, 2.0)
    assert detector.reach_px > 0 and cropped[region].gt(0).any()
    assert torch.equal(cropped, blob / detector.class_scale[classes] * region)


def gaussian_blob(amplitude: float, s: float, spacing: float, half_extent_mm: float) -> torch.Tensor:
    n = int(round(half_extent_mm / spacing))
    axis = np.arange(-n, n + 1) * spacing
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    return torch.tensor(amplitude * np.exp(-(x**2 + y**2 + z**2) / (2 * s**2)), dtype=torch.float32)


def test_blobness_at_a_gaussian_blob_is_the_analytic_value():
    """Smoothing a Gaussian blob of width s with sigma gives a Gaussian of variance s^2 + sigma^2 whose centre has
    three equal eigenvalues -A s^3 / (s^2 + sigma^2)^(5/2); scale-normalized, times sigma^2."""
    amplitude, s, spacing = 100.0, 3.0, 0.5
    volume = gaussian_blob(amplitude, s, spacing, half_extent_mm=20.0)
    k = volume.shape[0] // 2
    stack = volume[None]  # [1, C, H, W]: every slice is context of the middle one
    for sigma in (2.0, 3.0):
        measured = float(blobness(stack, [sigma], spacing, spacing)[0, 0, k, k])
        expected = sigma**2 * amplitude * s**3 / (s**2 + sigma**2) ** 2.5
        assert measured == pytest.approx(expected, rel=0.02)


def test_a_ball_is_a_blob_and_tubes_are_not():
    """A 8 mm ball, a tube along S and one in plane, all 40 HU in lung at -850: only the ball is a blob; with
    shape "tube" all three respond, and flat lung does not."""
    z, y, x = np.meshgrid(np.arange(21) * 2.0, np.arange(64) * 1.75, np.arange(64) * 1.75, indexing="ij")
    hu = np.full(z.shape, -850.0)
    hu[(z - 20) ** 2 + (y - 28) ** 2 + (x - 28) ** 2 < 16] = 40.0
    hu[(y - 28) ** 2 + (x - 84) ** 2 < 4] = 40.0  # along S
    hu[(z - 20) ** 2 + (y - 84) ** 2 < 4] = 40.0  # along L, in the scored slice
    stack = with_context(torch.tensor(hu, dtype=torch.float32), [10], 3)
    blob = blobness(stack, [2.0, 3.0, 4.0], 1.75, 2.0)[0, 0]
    assert float(blob[16, 16]) > 100.0
    assert float(blob[16, 48]) < 1.0 and float(blob[48, 30]) < 1.0
    assert float(blob.max()) == pytest.approx(float(blob[14:19, 14:19].max()))
    tube = blobness(stack, [1.0, 1.5, 2.0], 1.75, 2.0, shape="tube")[0, 0]
    assert min(float(tube[16, 16]), float(tube[16, 48]), float(tube[48, 30])) > 100.0
    assert float(tube[40:44, 4:8].max()) < 1.0  # lung far from all three


def test_shape_must_be_blob_or_tube():
    card = {"input": {"size": 32, "spacing_mm": 7.0, "window_hu": [-1000, 500], "context_slices": 1},
            "architecture": {"shape": "sheet"}}
    with pytest.raises(ModelError, match="use blob or tube"):
        ShapeOutlierDetector(card)


def test_it_needs_context_slices():
    card = {"input": {"size": 32, "spacing_mm": 7.0, "window_hu": [-1000, 500]}}
    with pytest.raises(ModelError, match="context_slices >= 1"):
        ShapeOutlierDetector(card)


def test_trained_on_real_ct_it_outlines_an_inserted_nodule(demo_image, tmp_path):
    """Statistics of the demo CT's training slabs (no network; real file, real calibration on its held-out slab),
    then detection on the demo CT with a 14 mm solid nodule inserted in its lung: the strongest finding is the
    nodule, and the untouched CT has no finding there."""
    source = tmp_path / "demo.nii.gz"
    sitk.WriteImage(demo_image, str(source))
    spec = {"size": 256, "spacing_mm": 1.75, "window_hu": [-1000.0, 500.0], "region": "body", "smoothing_mm": 1.0,
            "slice_mm": 2.0, "context_slices": 3}
    bundle = train("shape-outlier", [str(source)], tmp_path / "shape", name="shape-test", steps=0, input=spec)
    bundle = ModelBundle.load(bundle.path)
    bundle.verify()
    card = bundle.card
    assert card["method"] == "shape-outlier" and card["training"]["data"][0]["slice_spacing_mm"] == 2.0
    scales = card["training"]["class_scale"]
    assert len(scales) == len(card["architecture"]["class_edges_hu"]) - 1 and min(scales) >= 5.0
    json.dumps(card)

    insertion = LesionInserter(demo_image).insert("nodule_solid", seed=3, diameter_mm=14.0)
    labels = insertion.mask
    assert labels.any()
    lesioned = sitk.GetImageFromArray(insertion.volume)
    lesioned.CopyInformation(demo_image)
    result = detect_volume(volume_from_image(lesioned, name="nodule"), bundle)
    assert result.findings, "no finding"
    top = max(result.findings, key=lambda f: f["peak_significance"])
    assert ((result.labels == top["label"]) & labels).any(), f"the strongest finding misses the nodule: {top}"
    clean = detect_volume(volume_from_image(demo_image, name="clean"), bundle)
    assert not (clean.labels[labels] > 0).any()


def test_the_shipped_tube_outlier_outlines_an_inserted_needle(demo_image):
    """The shipped tube statistics (window to 3071 HU, the whole body) on the demo CT with a 1.5 mm metal needle
    inserted: the needle is the strongest finding; the untouched CT has no finding on it."""
    insertion = LesionInserter(demo_image).insert("needle", seed=5, diameter_mm=1.5, streaks=False)
    lesioned = sitk.GetImageFromArray(insertion.volume)
    lesioned.CopyInformation(demo_image)
    result = detect_volume(volume_from_image(lesioned, name="needle"), "chest-ct-tube-outlier")
    assert result.findings, "no finding"
    top = max(result.findings, key=lambda f: f["peak_significance"])
    assert ((result.labels == top["label"]) & insertion.mask).any(), f"the strongest finding misses the needle: {top}"
    clean = detect_volume(volume_from_image(demo_image, name="clean"), "chest-ct-tube-outlier")
    assert not (clean.labels[insertion.mask] > 0).any()
