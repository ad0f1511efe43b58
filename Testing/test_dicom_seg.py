"""A DICOM input also gets its findings as a DICOM Segmentation (anomalies.seg.dcm) and as a DICOM Structured Report
(anomalies.sr.dcm), read back here with highdicom and pydicom: one segment per finding, voxel for voxel labels.nrrd,
in the source series' patient, study and frame of reference, each frame referencing the CT slice it lies on; one
measurement group per finding in the report, tracking and referencing its segment."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

import medanomaly
from conftest import reoriented, write_dicom_series
from medanomaly.outputs import DICOM_SEG_FILE, DICOM_SR_FILE, FINDING_TERMINOLOGY, P_VALUE_CODE

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def nodule_series(small_ct, tmp_path_factory):
    """The small real CT with a dense 20 mm mass in lung, stored as a DICOM series in RAS order (rows and columns
    flipped against LPS), so that the SEG's frames must follow the series' own geometry."""
    from test_outputs import insert_nodule

    image, mask = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    image, _, _ = reoriented(image, "ras")
    folder = tmp_path_factory.mktemp("dicom_seg") / "series"
    write_dicom_series(image, folder, suffix=".dcm")
    return folder


def test_dicom_seg_matches_the_labels_and_references_the_series(nodule_series, default_model, tmp_path):
    before = folder_digest(nodule_series)
    (result,) = medanomaly.detect(nodule_series, tmp_path / "out", model=str(default_model), sensitivity=0.9)
    assert result.findings, "a dense 20 mm mass inserted in lung must give a finding"
    assert folder_digest(nodule_series) == before, "the input series must not change"
    case = result.output_dir
    summary = json.loads((case / "findings.json").read_text(encoding="utf-8"))
    assert DICOM_SEG_FILE in summary["files"] and not summary["warnings"]

    seg = hd.seg.segread(case / DICOM_SEG_FILE)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.SegmentationType == "BINARY"
    sources = [pydicom.dcmread(f, stop_before_pixels=True)
               for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(nodule_series))]
    first = sources[0]
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert getattr(seg, keyword) == getattr(first, keyword), keyword
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID

    # one segment per finding, named, coded and described as in the .seg.nrrd and findings.json
    assert seg.number_of_segments == len(result.findings)
    for item, finding in zip(seg.SegmentSequence, result.findings):
        assert item.SegmentNumber == finding["label"] and item.SegmentLabel == finding["name"]
        category, kind = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert [category.CodingSchemeDesignator, category.CodeValue] == FINDING_TERMINOLOGY["category"][:2]
        assert [kind.CodingSchemeDesignator, kind.CodeValue] == FINDING_TERMINOLOGY["type"][:2]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentDescription.startswith(f"p {finding['p_value']:.2g}, ")

    # voxel for voxel the label map, slice by slice through the source instances in the order the CT was read
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nrrd")))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                               combine_segments=True, skip_overlap_checks=True)
    assert pixels.shape == labels.shape
    assert np.array_equal(pixels, labels)
    # every stored frame lies on a CT slice and references it; only slices with a finding are stored
    positions = {s.SOPInstanceUID: np.array(s.ImagePositionPatient, float) for s in sources}
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == sum(int(np.any(labels[k] == f["label"])) for f in result.findings
                              for k in range(labels.shape[0]))
    for frame in frames:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, positions[source], atol=1e-3)


def test_series_without_frame_of_reference_gets_a_warning_not_a_failure(small_ct, default_model, tmp_path):
    from test_outputs import insert_nodule

    image, _ = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    folder = tmp_path / "no_frame_of_reference"
    write_dicom_series(image, folder, frame_of_reference=False)
    (result,) = medanomaly.detect(folder, tmp_path / "out", model=str(default_model), sensitivity=0.9)
    assert result.findings
    case = result.output_dir
    assert not (case / DICOM_SEG_FILE).exists()
    assert (case / "anomalies.seg.nrrd").is_file() and (case / "labels.nrrd").is_file()
    summary = json.loads((case / "findings.json").read_text(encoding="utf-8"))
    assert not (case / DICOM_SR_FILE).exists()
    assert any("no DICOM SEG or SR written: the CT series has no Frame of Reference UID (de-identified" in w
               for w in summary["warnings"])


def test_files_and_folders_without_findings_get_no_dicom_seg(small_ct, default_model, tmp_path):
    """A file input has no series to reference; a SEG cannot hold zero segments."""
    from test_outputs import insert_nodule

    image, _ = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    path = tmp_path / "nodule.nii.gz"
    sitk.WriteImage(image, str(path))
    (result,) = medanomaly.detect(path, tmp_path / "out", model=str(default_model), sensitivity=0.9)
    assert result.findings and not (result.output_dir / DICOM_SEG_FILE).exists()
    assert not (result.output_dir / DICOM_SR_FILE).exists()
    folder = tmp_path / "normal_series"
    write_dicom_series(small_ct, folder)
    (result,) = medanomaly.detect(folder, tmp_path / "out", model=str(default_model), sensitivity=0.0)
    assert not result.findings and not (result.output_dir / DICOM_SEG_FILE).exists()
    assert not (result.output_dir / DICOM_SR_FILE).exists()
    assert not json.loads((result.output_dir / "findings.json").read_text(encoding="utf-8"))["warnings"]


def test_dicom_sr_lists_each_finding_and_references_its_segment(nodule_series, default_model, tmp_path):
    """anomalies.sr.dcm: a TID 1500 measurement report with one volumetric group per finding, tracked by its SEG
    segment's tracking UID, referencing that segment, with the volume, mean HU and p-value of findings.json."""
    (result,) = medanomaly.detect(nodule_series, tmp_path / "out", model=str(default_model), sensitivity=0.9)
    case = result.output_dir
    summary = json.loads((case / "findings.json").read_text(encoding="utf-8"))
    assert DICOM_SR_FILE in summary["files"] and not summary["warnings"]
    seg = hd.seg.segread(case / DICOM_SEG_FILE)
    sr = hd.sr.srread(case / DICOM_SR_FILE)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE and sr.CompletionFlag == "COMPLETE"
    for keyword in ("PatientID", "StudyInstanceUID"):
        assert getattr(sr, keyword) == getattr(seg, keyword), keyword
    assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID, seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    # the evidence: every CT instance of the series and the SEG
    evidence = {series.SeriesInstanceUID: {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
                for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence}
    ct_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in nodule_series.iterdir()}
    assert evidence == {seg.ReferencedSeriesSequence[0].SeriesInstanceUID: ct_uids,
                        seg.SeriesInstanceUID: {seg.SOPInstanceUID}}

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nrrd")))
    slice_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID  # in the order the CT was read
                  for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(nodule_series))]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.findings) == seg.number_of_segments
    for group, finding, segment in zip(groups, result.findings, seg.SegmentSequence):
        assert group.tracking_uid == segment.TrackingUID
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [finding["label"]]
        # the CT slices the finding lies on, and only those
        on = {slice_uids[k] for k in np.flatnonzero((labels == finding["label"]).any(axis=(1, 2)))}
        assert {image.referenced_sop_instance_uid for image in reference.source_images_for_segmentation} == on
        assert group.finding_type.value == FINDING_TERMINOLOGY["type"][1]
        values = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
        assert values == {"118565006": (pytest.approx(finding["volume_mm3"]), "mm3"),
                          "112181": (pytest.approx(finding["mean_hu"]), "[hnsf'U]"),
                          P_VALUE_CODE[1]: (pytest.approx(finding["p_value"]), "1")}


def test_dicom_sr_of_a_single_finding(small_ct, tmp_path):
    """A SEG of one segment keeps its segment number in the shared functional groups, where highdicom's
    ReferencedSegment.from_segmentation does not look (it failed on it): the SR still references the segment and
    the CT slices it lies on."""
    from medanomaly.outputs import write_dicom_report, write_dicom_segmentation
    from medanomaly.volumes import read_volume

    folder = tmp_path / "series"
    write_dicom_series(small_ct[:, :, :8], folder)
    volume = read_volume(folder)
    labels = np.zeros(sitk.GetArrayViewFromImage(volume.image).shape, np.uint8)
    labels[3:5, 40:50, 40:50] = 1
    finding = {"id": 1, "label": 1, "name": "Anomaly 1", "p_value": 0.001, "volume_mm3": 123.0, "mean_hu": -20.5}
    seg, sources = write_dicom_segmentation(labels, [finding], volume.image, volume.dicom_files, tmp_path / "seg.dcm",
                                            model_name="test", software_version="0")
    assert seg.number_of_segments == 1
    write_dicom_report(seg, sources, [finding], tmp_path / "sr.dcm", model_name="test", software_version="0")
    (group,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    reference = group.referenced_segment
    assert reference.referenced_segment_numbers == [1] and reference.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert {image.referenced_sop_instance_uid for image in reference.source_images_for_segmentation} == \
        {sources[3].SOPInstanceUID, sources[4].SOPInstanceUID}
