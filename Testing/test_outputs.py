"""The case folder: files Slicer reads (checked with slicerio and slicer-core's MRML reader), findings.json, MOOD
files, atomic writes, progress and cancellation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy import ndimage as ndi

import medanomaly
from medanomaly.errors import Cancelled
from medanomaly.calibration import count_components, min_voxels_for
from medanomaly.volumes import read_volume, volume_from_image
from medanomaly.outputs import FINDING_TERMINOLOGY


def insert_nodule(image: sitk.Image, radius_mm: float = 7.0, hu: float = 40.0) -> tuple[sitk.Image, np.ndarray]:
    """A solid sphere in the darkest (lung) part of the middle slices; returns the image and its mask [k, j, i]."""
    arr = sitk.GetArrayFromImage(image).astype(np.int16)
    smooth = ndi.gaussian_filter(arr.astype(np.float32), 3)
    k = arr.shape[0] // 2
    j0, j1, i0, i1 = [int(f * s) for f, s in ((0.3, arr.shape[1]), (0.7, arr.shape[1]),
                                              (0.2, arr.shape[2]), (0.45, arr.shape[2]))]
    j, i = np.unravel_index(np.argmin(smooth[k, j0:j1, i0:i1]), (j1 - j0, i1 - i0))
    centre = np.array([k, j + j0, i + i0])
    sz, sy, sx = image.GetSpacing()[::-1]
    kk, jj, ii = np.ogrid[:arr.shape[0], :arr.shape[1], :arr.shape[2]]
    mask = ((kk - centre[0]) * sz) ** 2 + ((jj - centre[1]) * sy) ** 2 + ((ii - centre[2]) * sx) ** 2 <= radius_mm**2
    arr[mask] = hu
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out, mask


@pytest.fixture(scope="module")
def nodule_case(small_ct, default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    image, mask = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)  # a dense 20 mm mass in lung
    path = root / "nodule_ct.nii.gz"
    sitk.WriteImage(image, str(path))
    stages = []
    (result,) = medanomaly.detect(path, root / "out", model=str(default_model), mood=True, sensitivity=0.9,
                                  progress=lambda stage, fraction: stages.append((stage, fraction)))
    return result, mask, image, stages, root


def test_nodule_is_found_and_files_exist(nodule_case):
    result, mask, _, _, _ = nodule_case
    case = result.output_dir
    for name in ("heatmap.nrrd", "labels.nrrd", "anomalies.seg.nrrd", "findings.json", "overview.png",
                 "reconstruction.nrrd"):
        assert (case / name).is_file(), name
    assert result.findings, "a dense 20 mm mass inserted in lung must give a finding"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nrrd")))
    hit = {int(v) for v in np.unique(labels[mask]) if v}
    assert hit, "a finding must overlap the nodule"
    assert np.array_equal(labels, result.labels)


def test_segmentation_read_by_slicerio(nodule_case):
    result, _, image, _, _ = nodule_case
    seg = slicerio.read_segmentation(str(result.output_dir / "anomalies.seg.nrrd"))
    segments = seg["segments"]
    assert [s["name"] for s in segments] == [f"Anomaly {i}" for i in range(1, len(result.findings) + 1)]
    colors = {tuple(s["color"]) for s in segments}
    assert len(colors) == len(segments), "colours must be distinct"
    for s in segments:
        assert s["terminology"]["category"] == FINDING_TERMINOLOGY["category"]
        assert s["terminology"]["type"] == FINDING_TERMINOLOGY["type"]
    voxels = seg["voxels"]  # i, j, k
    labels = result.labels.T
    for f, s in zip(result.findings, segments):
        assert np.array_equal(voxels == s["labelValue"], labels == f["label"])


def test_segmentation_read_by_slicer_mrml(nodule_case):
    slicer = pytest.importorskip("slicer")
    import vtk

    result, _, image, _, _ = nodule_case
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(result.output_dir / "anomalies.seg.nrrd"))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(result.findings)
    for n, f in enumerate(result.findings):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == f["name"]
        tag = vtk.reference("")
        assert segment.GetTag("TerminologyEntry", tag)
        assert "SCT^49755003^Morphologically Altered Structure" in str(tag)
        labelmap = segment.GetRepresentation("Binary labelmap")
        assert labelmap is not None
    # geometry of the labelmap: RAS origin and spacing of the input
    labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    spacing = image.GetSpacing()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ras = np.diag([-1, -1, 1]) @ direction * np.array(spacing)
    got = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    np.testing.assert_allclose(got, ras, atol=1e-6)
    # the segment's voxels match labels.nrrd
    extent = labelmap.GetExtent()
    from vtk.util.numpy_support import vtk_to_numpy

    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
    label = segmentation.GetNthSegment(0).GetLabelValue()
    sub = result.labels[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1]
    assert np.array_equal(values == label, sub == 1)


def test_findings_json(nodule_case):
    result, mask, image, _, _ = nodule_case
    summary = json.loads((result.output_dir / "findings.json").read_text())
    assert 0.0 <= summary["volume_score"] <= 1.0
    assert summary["model"]["name"] == "chest-ct-vqvae-recon"
    assert summary["software"]["medanomaly"] == medanomaly.__version__
    assert {"pipeline", "network", "write"} <= set(summary["timings_s"])
    assert summary["peak_rss_mb"] > 0
    top = summary["findings"][0]
    for key in ("id", "centroid_lps_mm", "centroid_ras_mm", "bbox_ijk", "slice_range_k", "volume_mm3",
                "max_probability", "mean_probability", "mean_hu", "peak_significance", "significance",
                "expected_normal_findings", "p_value"):
        assert key in top
    # measurements agree with the label map
    labels = result.labels
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    for f in summary["findings"]:
        region = labels == f["label"]
        assert f["volume_mm3"] == pytest.approx(region.sum() * voxel_mm3, abs=0.006)
        k, j, i = np.nonzero(region)
        assert f["bbox_ijk"]["min"] == [int(i.min()), int(j.min()), int(k.min())]
        lps = image.TransformContinuousIndexToPhysicalPoint((i.mean(), j.mean(), k.mean()))
        np.testing.assert_allclose(f["centroid_lps_mm"], lps, atol=0.01)
        np.testing.assert_allclose(f["centroid_ras_mm"], [-lps[0], -lps[1], lps[2]], atol=0.01)
        hu = sitk.GetArrayFromImage(image)[region].mean()
        assert f["mean_hu"] == pytest.approx(hu, abs=0.06)
        assert f["max_probability"] >= summary["threshold"]
        assert f["peak_significance"] >= f["significance"] >= summary["threshold_significance"] - 1e-6
        assert f["p_value"] == pytest.approx(-np.expm1(-f["expected_normal_findings"]), rel=1e-3)
    ranks = [(f["significance"], f["peak_significance"], f["volume_mm3"]) for f in summary["findings"]]
    assert ranks == sorted(ranks, key=lambda r: (-r[0], -r[1], -r[2]))


def test_finding_strength_is_the_highest_level_that_keeps_its_minimum_size(nodule_case):
    """Brute force over the finding's own values: the highest significance at which some 26-connected part of it
    still has the minimum size."""
    result, _, image, _, _ = nodule_case
    min_voxels = min_voxels_for(result.settings["min_size_mm3"], float(np.prod(image.GetSpacing())))
    for f in result.findings[:3]:
        region = result.labels == f["label"]
        for level in np.unique(result.significance[region])[::-1]:
            if count_components(region & (result.significance >= level), min_voxels):
                break
        assert f["significance"] == pytest.approx(float(level), abs=1e-3)


def test_a_findings_expected_count_is_the_fp_rate_at_which_it_drops_out(nodule_case, default_model):
    """Asked for fewer false findings per normal volume than a finding's expected count, detect drops it; asked for
    a few more, it keeps it. Far in the tail (thresholds beyond float32 probability), where a float32 heatmap
    could not tell the two apart."""
    result, _, image, _, _ = nodule_case
    top = result.findings[0]
    expected = top["expected_normal_findings"]
    assert top["significance"] > 8, "the dense mass lies beyond what a float32 probability resolves"
    volume = volume_from_image(image, name="nodule_ct")
    kept = medanomaly.detect_volume(volume, str(default_model), device="cpu", fp_rate=expected * 1.05)
    dropped = medanomaly.detect_volume(volume, str(default_model), device="cpu", fp_rate=expected * 0.95)
    assert any(f["significance"] == top["significance"] for f in kept.findings)
    assert all(f["significance"] < top["significance"] for f in dropped.findings)
    assert np.float32(kept.threshold) == np.float32(dropped.threshold), "a float32 probability cannot separate them"


def test_mood_files(nodule_case):
    result, _, image, _, root = nodule_case
    pixel = sitk.ReadImage(result.files["mood"]["pixel"])
    arr = sitk.GetArrayFromImage(pixel)
    assert arr.shape == sitk.GetArrayFromImage(image).shape
    assert arr.min() >= 0 and arr.max() < 1
    s = result.significance.astype(np.float64)
    np.testing.assert_allclose(arr, s / (1 + s), rtol=1e-6, atol=1e-7)
    # the same order as the probabilities, without their float32 ties at 1
    tied = result.heatmap == 1.0
    assert np.unique(arr[tied]).size > 1 or tied.sum() <= 1
    sample = (root / "out" / "mood" / "sample" / "nodule_ct.nii.gz.txt").read_text().strip()
    volume_s = -np.log10(result.volume_p_value)
    assert 0.0 <= float(sample) < 1.0
    assert float(sample) == pytest.approx(volume_s / (1 + volume_s), abs=1e-8)


def test_progress_reported(nodule_case):
    _, _, _, stages, _ = nodule_case
    names = [s for s, _ in stages]
    assert names[0] == "preprocess" and "network" in names and names[-1] == "postprocess"
    network = [f for s, f in stages if s == "network"]
    assert network == sorted(network) and network[-1] == 1.0


def test_no_staging_folder_left(nodule_case):
    _, _, _, _, root = nodule_case
    hidden = [p.name for p in (root / "out").iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_cancel_writes_nothing(small_ct_file, default_model, tmp_path):
    calls = []

    def cancel():
        calls.append(1)
        return True

    with pytest.raises(Cancelled):
        medanomaly.detect(small_ct_file, tmp_path / "out", model=str(default_model), cancel=cancel)
    assert calls
    assert list((tmp_path / "out").iterdir()) == []


def test_rerun_replaces_case_atomically(small_ct_file, default_model, tmp_path):
    (first,) = medanomaly.detect(small_ct_file, tmp_path / "out", model=str(default_model))
    (second,) = medanomaly.detect(small_ct_file, tmp_path / "out", model=str(default_model), sensitivity=1.0)
    assert first.output_dir == second.output_dir
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small_ct"]
    summary = json.loads((second.output_dir / "findings.json").read_text())
    assert summary["settings"]["sensitivity"] == 1.0


def test_sensitivity_orders_thresholds(small_ct_file, default_model):
    volume = read_volume(small_ct_file)
    thresholds = [medanomaly.detect_volume(volume, str(default_model), sensitivity=s).threshold
                  for s in (0.0, 0.5, 1.0)]
    assert thresholds[0] > thresholds[1] > thresholds[2]
