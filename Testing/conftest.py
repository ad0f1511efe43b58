"""Shared fixtures: the small real CT shipped in Testing/Data, crops of it in every orientation, and DICOM series."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "Testing" / "Data"
DEMO_CT = DATA / "chest_ct_demo.nii.gz"
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
DEFAULT_MODEL = ROOT / "models" / "chest-ct-vqvae-recon"

sys.path.insert(0, str(ROOT / "SlicerMedAnomaly"))
os.environ.setdefault("MEDANOMALY_HOME", str(ROOT / ".pytest-medanomaly-home"))

requires_shared = pytest.mark.skipif(not SHARED_CT.is_dir(), reason="../shared/data/ct is absent (a user's clone)")


@pytest.fixture(scope="session")
def demo_image() -> sitk.Image:
    return sitk.ReadImage(str(DEMO_CT))


@pytest.fixture(scope="session")
def small_ct(demo_image) -> sitk.Image:
    """24 slices of the demo CT, 2x smaller in-plane again: a real chest CT that detects in well under a second."""
    return sitk.Shrink(demo_image[:, :, 18:42], [2, 2, 1])


@pytest.fixture
def small_ct_file(small_ct, tmp_path) -> Path:
    path = tmp_path / "small_ct.nrrd"
    sitk.WriteImage(small_ct, str(path), useCompression=True)
    return path


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not (DEFAULT_MODEL / "model_card.json").is_file():
        pytest.fail("the default model bundle models/chest-ct-vqvae-recon is missing from the repository")
    return DEFAULT_MODEL


def denser_tissue(image: sitk.Image, hu: float = 250.0, slices: slice = slice(None)) -> sitk.Image:
    """The CT with every tissue voxel (above -500 HU, the body threshold) of the given slices `hu` denser: unlike
    any normal CT as a whole, as from a scanner far off its HU calibration (the reference check's test input)."""
    from medanomaly.preprocess import BODY_THRESHOLD_HU

    arr = sitk.GetArrayFromImage(image)
    dense = arr.copy()
    part = arr[slices]
    dense[slices] = np.where(part > BODY_THRESHOLD_HU, part + hu, part)
    out = sitk.GetImageFromArray(dense.astype(np.int16))
    out.CopyInformation(image)
    return out


def write_dicom_series(image: sitk.Image, folder: Path, modality: str = "CT", series_uid: str | None = None,
                       description: str = "test series", suffix: str = "",
                       frame_of_reference: bool = True) -> list[Path]:
    """Write a 3D image as a DICOM series (one file per slice, optionally without a suffix or, unlike any real CT,
    without a Frame of Reference UID)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or f"1.2.826.0.1.3680043.8.498.{abs(hash((str(folder), modality))) % 10**12}"
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    files = []
    for z in range(image.GetDepth()):
        s = image[:, :, z]
        tags = {
            "0008|0060": modality, "0020|000e": series_uid, "0020|000d": series_uid + ".1",
            "0008|103e": description, "0010|0010": "Test^Patient", "0010|0020": "TEST01",
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                        direction[1], direction[4], direction[7])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z + 1), "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{z + 1}", "0028|1052": "0", "0028|1053": "1",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        if frame_of_reference:
            tags["0020|0052"] = series_uid + ".2"
        for key, value in tags.items():
            s.SetMetaData(key, value)
        path = folder / f"S{series_uid.split('.')[-1]}_{z:04d}{suffix}"
        writer.SetFileName(str(path))
        writer.Execute(s)
        files.append(path)
    return files


# what a Legacy Converted Enhanced CT needs of its sources, filled in where a writer or de-identification left it empty
LEGACY_CONVERTER_NEEDS = (
    ("StudyDate", "20260101"), ("StudyTime", "120000"), ("ContentDate", "20260101"), ("ContentTime", "120000"),
    ("Manufacturer", "Test"), ("PatientBirthDate", ""), ("PatientSex", ""), ("AccessionNumber", ""),
    ("ReferringPhysicianName", ""), ("StudyID", "1"), ("SeriesNumber", 1), ("KVP", 120), ("AcquisitionNumber", 1),
    ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
)


def legacy_enhanced_ct(datasets: list, path: Path, frame_order: list[int] | None = None) -> Path:
    """Single-frame CT datasets (decompressed) as one Legacy Converted Enhanced CT Image file (highdicom), the
    conversion a PACS or a scanner's export makes. The converter stores the frames by position; `frame_order` stores
    them in another order, each with its own tags."""
    import logging

    import highdicom as hd
    import pydicom

    for ds in datasets:
        for keyword, value in LEGACY_CONVERTER_NEEDS:
            if not ds.get(keyword):
                setattr(ds, keyword, value)
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # it notes the legacy frame type it cannot fill in
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    if frame_order is not None:
        pixels = enhanced.pixel_array
        groups = enhanced.PerFrameFunctionalGroupsSequence
        enhanced.PerFrameFunctionalGroupsSequence = pydicom.Sequence([groups[k] for k in frame_order])
        enhanced.PixelData = np.ascontiguousarray(pixels[list(frame_order)]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(path)
    return path


def write_enhanced_ct(image: sitk.Image, path: Path, intercepts: tuple[float, ...] = (-1024.0,),
                      frame_order: list[int] | None = None, drop_frames: tuple[int, ...] = ()) -> Path:
    """Write a 3D image as one multi-frame CT object (legacy_enhanced_ct), as modern scanners and PACS store a
    series. Frame k of the stacked slices is stored as unsigned values with rescale intercept
    intercepts[k % len(intercepts)] (several make the rescale differ frame by frame); `frame_order` stores the frames
    in another order (each keeps its own position); `drop_frames` leaves those slices out."""
    import pydicom

    slices = path.parent / f".{path.name}.slices"
    files = write_dicom_series(image, slices)
    datasets = []
    for k, file in enumerate(files):
        if k in drop_frames:
            continue
        ds = pydicom.dcmread(file)
        intercept = intercepts[k % len(intercepts)]
        stored = ds.pixel_array.astype(np.int32) - int(intercept)
        assert stored.min() >= 0 and stored.max() < 2**16, "the intercept must lie at or below the lowest value"
        ds.PixelData, ds.PixelRepresentation = stored.astype(np.uint16).tobytes(), 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
        datasets.append(ds)
    for file in files:
        file.unlink()
    slices.rmdir()
    return legacy_enhanced_ct(datasets, path, frame_order)


def grid_comparison(image: sitk.Image, reference: sitk.Image) -> dict:
    """How far `image` holds `reference`'s voxels at their physical places: sizes and spacings, the largest distance
    from a corner voxel's centre of `image` to a voxel centre of `reference` (in voxels and mm; the two grids may
    be stacked in opposite directions), and the voxels that differ after resampling `image` onto `reference`
    (nearest neighbour, no interpolation)."""
    corners = [(i, j, k) for i in (0, image.GetWidth() - 1) for j in (0, image.GetHeight() - 1)
               for k in (0, image.GetDepth() - 1)]
    offsets = []
    for corner in corners:
        index = np.array(reference.TransformPhysicalPointToContinuousIndex(image.TransformIndexToPhysicalPoint(corner)))
        offsets.append(np.abs(index - np.round(index)))
    offsets = np.array(offsets)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, -5000,
                              reference.GetPixelID())
    diff = np.abs(sitk.GetArrayFromImage(resampled).astype(np.int64)
                  - sitk.GetArrayFromImage(reference).astype(np.int64))
    return {"size": list(image.GetSize()), "reference_size": list(reference.GetSize()),
            "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
            "reference_spacing_mm": [round(v, 6) for v in reference.GetSpacing()],
            "max_corner_offset_voxels": float(offsets.max()),
            "max_corner_offset_mm": float((offsets * np.array(reference.GetSpacing())).max()),
            "voxels_differing": int((diff > 0).sum()), "max_abs_difference_hu": int(diff.max())}


def compress_jpeg_lossless(path: Path) -> Path:
    """Recompress a DICOM file's pixel data in place as JPEG Lossless (process 14, selection value 1), the
    compression PACS usually store CT in: encoded by GDCM, every header as it was (GDCM's image writer would rewrite
    an enhanced object's functional groups from its own idea of the geometry)."""
    import gdcm
    import pydicom

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), path
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change(), path
    encoded = path.parent / f".{path.name}.jpeg"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(encoded))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), path
    compressed = pydicom.dcmread(encoded)
    encoded.unlink()
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = compressed.file_meta.TransferSyntaxUID
    ds.PixelData = compressed.PixelData  # the encapsulated frames, in the stored order
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def reoriented(image: sitk.Image, kind: str):
    """The same physical CT stored in another orientation: voxels permuted/flipped with the geometry to match
    (exact), or, for "oblique", resampled onto a rotated grid. Returns (image, array permutation, flips); the
    permutation is None for the oblique grid."""
    arr = sitk.GetArrayFromImage(image)  # k, j, i
    spacing = np.array(image.GetSpacing())
    d = np.array(image.GetDirection()).reshape(3, 3)
    if kind == "oblique":
        rot = sitk.Euler3DTransform()
        rot.SetRotation(np.deg2rad(8), np.deg2rad(-5), np.deg2rad(20))
        new_dir = (np.array(rot.GetMatrix()).reshape(3, 3) @ d).ravel()
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) - 1) / 2.0))
        size = image.GetSize()
        new_origin = centre - np.array(new_dir).reshape(3, 3) @ ((np.array(size) - 1) / 2.0 * spacing)
        return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, new_origin.tolist(), spacing.tolist(),
                             new_dir.tolist(), -1024.0, image.GetPixelID()), None, None
    # array axis permutation (k, j, i order) and flips, in array terms
    if kind == "lps":
        return image, (0, 1, 2), (False, False, False)
    if kind == "ras":
        perm, flips = (0, 1, 2), (False, True, True)
    elif kind == "flipped_z":
        perm, flips = (0, 1, 2), (True, False, False)
    elif kind == "sagittal":  # slices along L-R: image axis k = physical x
        perm, flips = (2, 0, 1), (False, True, False)
    elif kind == "coronal":  # slices along A-P: image axis k = physical y
        perm, flips = (1, 0, 2), (False, True, False)
    else:
        raise ValueError(kind)
    new = np.transpose(arr, perm)
    for axis, flip in enumerate(flips):
        if flip:
            new = np.flip(new, axis)
    # image axis c (i, j, k) = array axis 2-c; new array axis a came from old array axis perm[a]
    new_dir = np.zeros((3, 3))
    new_spacing = np.zeros(3)
    shape_old = arr.shape
    corner_old_idx = np.zeros(3)  # old array index (k, j, i) of new index 0
    for a in range(3):
        old_a = perm[a]
        c_new, c_old = 2 - a, 2 - old_a
        sign = -1.0 if flips[a] else 1.0
        new_dir[:, c_new] = d[:, c_old] * sign
        new_spacing[c_new] = spacing[c_old]
        corner_old_idx[old_a] = shape_old[old_a] - 1 if flips[a] else 0
    new_origin = image.TransformIndexToPhysicalPoint([int(v) for v in corner_old_idx[::-1]])
    out = sitk.GetImageFromArray(np.ascontiguousarray(new))
    out.SetSpacing(new_spacing.tolist())
    out.SetDirection(new_dir.ravel().tolist())
    out.SetOrigin(new_origin)
    return out, perm, flips
