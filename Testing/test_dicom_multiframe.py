"""Multi-frame (enhanced) DICOM CT: one file holds the whole series, each frame with its own position and rescale.
Written here with highdicom from the small real CT (a Legacy Converted Enhanced CT Image) and read back as the
single-frame series it came from would be: the same voxels in HU at the same places, whatever order the frames are
stored in; irregular frames refused; the DICOM SEG referencing the frames."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

import medanomaly
from conftest import compress_jpeg_lossless, grid_comparison, write_dicom_series, write_enhanced_ct
from medanomaly.errors import InputError
from medanomaly.outputs import DICOM_SEG_FILE, DICOM_SR_FILE
from medanomaly.volumes import read_volume

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

# stored frames in a shuffled order, each frame's rescale intercept one of three (as a scanner may vary it)
SHUFFLED = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 4, 6]
INTERCEPTS = (-1024.0, -1100.0, -2048.0)  # none above the CT's lowest value, -1024


def frame_positions(path) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence],
                    float)


def same_voxels_and_places(image: sitk.Image, reference: sitk.Image) -> None:
    """`image` holds `reference`'s voxels at their physical places: its grid is the reference's, possibly stacked the
    other way, and resampled onto the reference (nearest, no interpolation) it equals it exactly."""
    found = grid_comparison(image, reference)
    assert found["size"] == found["reference_size"]
    np.testing.assert_allclose(found["spacing_mm"], found["reference_spacing_mm"], atol=1e-5)
    assert found["max_corner_offset_voxels"] <= 1e-3  # every voxel centre of one grid is a voxel centre of the other
    assert found["voxels_differing"] == 0


def test_enhanced_ct_reads_as_its_single_frame_series(small_ct, tmp_path):
    """SimpleITK (GDCM) alone reads such a file with one frame's rescale for every frame (about 1,000 HU off on two
    frames in three here), misplaces frames stored out of order, and reads the folder as a 4D image; the reader
    places and scales each frame by its own tags."""
    reference = read_volume(write_dicom_series(small_ct[:, :, :12], tmp_path / "series")[0].parent).image
    path = write_enhanced_ct(small_ct[:, :, :12], tmp_path / "enhanced" / "ct.dcm", intercepts=INTERCEPTS,
                             frame_order=SHUFFLED)
    along = frame_positions(path)[:, 2]
    assert not (np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)), "the frames must be stored out of order"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for given in (path.parent, path):  # the folder, or the file itself
        volume = read_volume(given)
        same_voxels_and_places(volume.image, reference)
        assert volume.hu.dtype == np.int16
        assert volume.dicom_files == [str(path)]
        assert volume.series_uid == pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
    assert volume.case_name == "ct"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the input must not change"


def test_jpeg_lossless_enhanced_ct_reads_as_uncompressed(small_ct, tmp_path):
    """JPEG Lossless, which pydicom decodes only through a plugin (python-gdcm here): the same HU at the same places."""
    reference = read_volume(write_dicom_series(small_ct[:, :, :12], tmp_path / "series")[0].parent).image
    path = write_enhanced_ct(small_ct[:, :, :12], tmp_path / "enhanced" / "ct.dcm", intercepts=INTERCEPTS,
                             frame_order=SHUFFLED)
    compress_jpeg_lossless(path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    same_voxels_and_places(read_volume(path).image, reference)


def test_undecodable_enhanced_ct_is_one_line(small_ct, tmp_path, capsys):
    """Frames that cannot be decoded (pixel data that is not what its transfer syntax says): one error line, no
    traceback (highdicom logs one before it raises), nothing written, the file unchanged."""
    from test_bad_input import detect_fails

    path = write_enhanced_ct(small_ct[:, :, :6], tmp_path / "enhanced" / "ct.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    ds.PixelData = pydicom.encaps.encapsulate([bytes(range(256)) * 4] * int(ds.NumberOfFrames))  # no RLE header
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    detect_fails(path, tmp_path, capsys, "the multi-frame DICOM file's frames could not be read as one volume")


@pytest.mark.parametrize("fault", ["missing", "repeated"])
def test_irregular_enhanced_ct_refused(small_ct, tmp_path, fault):
    """A frame missing from the stack, or two frames at one place (two phases of a cardiac CT in one object), is
    refused in one line that names the stored frames, as for a series of files."""
    image = small_ct[:, :, :12]
    if fault == "missing":
        path = write_enhanced_ct(image, tmp_path / "ct.dcm", drop_frames=(5,))
        expect = "frames 5 and 6 are 4 mm apart where the series' spacing is 2 mm"
    else:  # frame 5 stored twice
        path = write_enhanced_ct(image, tmp_path / "ct.dcm")
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
        ds.PerFrameFunctionalGroupsSequence.append(ds.PerFrameFunctionalGroupsSequence[4])
        ds.PixelData = np.concatenate([frames, frames[4:5]]).tobytes()
        ds.NumberOfFrames = 13
        ds.save_as(path)
        expect = "two frames lie at the same position"
    with pytest.raises(InputError, match=expect):
        read_volume(path.parent)


def test_a_single_dicom_slice_is_refused_with_what_to_give(small_ct, tmp_path):
    files = write_dicom_series(small_ct[:, :, :3], tmp_path / "series")
    with pytest.raises(InputError, match="a single DICOM slice; give the folder that holds the whole series"):
        read_volume(files[1])


def test_dicom_seg_of_an_enhanced_ct_references_its_frames(small_ct, default_model, tmp_path):
    from test_outputs import insert_nodule

    image, _ = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    order = list(np.random.default_rng(3).permutation(image.GetDepth()))
    path = write_enhanced_ct(image, tmp_path / "enhanced" / "ct.dcm", frame_order=order)
    (result,) = medanomaly.detect(path.parent, tmp_path / "out", model=str(default_model), sensitivity=0.9)
    assert result.findings, "a dense 20 mm mass inserted in lung must give a finding"
    case = result.output_dir
    summary = json.loads((case / "findings.json").read_text(encoding="utf-8"))
    assert DICOM_SEG_FILE in summary["files"] and DICOM_SR_FILE in summary["files"] and not summary["warnings"]
    seg = hd.seg.segread(case / DICOM_SEG_FILE)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    sr = hd.sr.srread(case / DICOM_SR_FILE)
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == len(result.findings)
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert getattr(seg, keyword) == getattr(source, keyword), keyword

    # label slice k of labels.nrrd lies where stored frame number n(k) lies: the SEG by those frames is the labels
    labels_image = sitk.ReadImage(str(case / "labels.nrrd"))
    labels = sitk.GetArrayFromImage(labels_image)
    positions = frame_positions(path)
    numbers = []
    for k in range(labels.shape[0]):
        where = np.array(labels_image.TransformIndexToPhysicalPoint((0, 0, k)))
        (match,) = np.flatnonzero(np.linalg.norm(positions - where, axis=1) < 1e-3)
        numbers.append(int(match) + 1)
    pixels = seg.get_pixels_by_source_frame(source_sop_instance_uid=source.SOPInstanceUID,
                                            source_frame_numbers=numbers, combine_segments=True,
                                            skip_overlap_checks=True)
    assert np.array_equal(pixels, labels)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each stored frame on the source frame it references
        reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   positions[int(reference.ReferencedFrameNumber) - 1], atol=1e-3)


def test_a_folder_of_enhanced_series_is_one_case_per_series(small_ct, tmp_path):
    """PACS exports often put each enhanced series, one file each, in one folder: the batch's --each-series gives
    each its own case, and each reads as its own CT."""
    from medanomaly.batch import find_inputs

    folder = tmp_path / "export"
    upper = write_enhanced_ct(small_ct[:, :, :10], folder / "upper.dcm")
    lower = write_enhanced_ct(small_ct[:, :, 12:24], folder / "lower.dcm")
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID: p for p in (upper, lower)}
    inputs = find_inputs([str(tmp_path)], each_series=True)
    assert len(inputs) == 2
    for item in inputs:
        volume = read_volume(item)
        assert volume.dicom_files == [str(uids[volume.series_uid])]
        assert volume.image.GetDepth() == (10 if uids[volume.series_uid] == upper else 12)
    volume = read_volume(folder)  # without a choice: the series with the most slices, with a warning
    assert volume.image.GetDepth() == 12 and "12 slices" in volume.warnings[0]
