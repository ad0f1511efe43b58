"""Every kind of bad input gives one clear line, a non-zero exit, no traceback, no output and an untouched input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ROOT, write_dicom_series

from medanomaly.cli import main


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, out_dir: Path, expect: str):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("medanomaly: error:"), lines[0]
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]
    # nothing half-written: no case folder and no staging folder
    if out_dir.exists():
        leftovers = [p.name for p in out_dir.iterdir()]
        assert leftovers == [], leftovers


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(digest(p).encode() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def detect_fails(path: Path, tmp_path: Path, capsys, expect: str, *extra) -> None:
    out = tmp_path / "out"
    before = digest(path) if path.exists() else None
    code, _, err = run_cli(["detect", str(path), "-o", str(out), *extra], capsys)
    assert_clean_failure(code, err, out, expect)
    if before is not None:
        assert digest(path) == before, "the input was modified"


def test_missing_file(tmp_path, capsys):
    detect_fails(tmp_path / "nope.nii.gz", tmp_path, capsys, "no such file")


def test_truncated_file(small_ct_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.nrrd"
    data = small_ct_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    detect_fails(truncated, tmp_path, capsys, "truncated or corrupt")


def test_truncated_gzip_nifti(small_ct, tmp_path, capsys):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    detect_fails(path, tmp_path, capsys, "ct.nii.gz")


def test_not_an_image(tmp_path, capsys):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"these are meeting notes, not an image\n" * 20))
    detect_fails(path, tmp_path, capsys, "not a readable image")
    text = tmp_path / "report.txt"
    text.write_text("hello")
    detect_fails(text, tmp_path, capsys, "not a readable image")


def test_2d_image(small_ct, tmp_path, capsys):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(small_ct[:, :, 5], str(path))
    detect_fails(path, tmp_path, capsys, "2D")


def test_single_slice_volume(small_ct, tmp_path, capsys):
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(small_ct[:, :, 5:6], str(path))
    detect_fails(path, tmp_path, capsys, "2D")


def test_4d_image(small_ct, tmp_path, capsys):
    arr = sitk.GetArrayFromImage(small_ct)
    path = tmp_path / "series4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([arr.T, arr.T], axis=-1), np.eye(4)), str(path))
    detect_fails(path, tmp_path, capsys, "4D")


def test_multicomponent_image(small_ct, tmp_path, capsys):
    arr = sitk.GetArrayFromImage(small_ct)
    rgb = sitk.GetImageFromArray(np.stack([arr, arr, arr], axis=-1), isVector=True)
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(rgb, str(path))
    detect_fails(path, tmp_path, capsys, "components")


def test_empty_dicom_folder(tmp_path, capsys):
    folder = tmp_path / "empty_dicom"
    folder.mkdir()
    detect_fails(folder, tmp_path, capsys, "no DICOM series")
    (folder / "readme.txt").write_text("not dicom")
    detect_fails(folder, tmp_path, capsys, "no DICOM series")


def test_mr_series_refused(small_ct, tmp_path, capsys):
    folder = tmp_path / "mr"
    write_dicom_series(small_ct[:, :, :6], folder, modality="MR")
    detect_fails(folder, tmp_path, capsys, "no CT series")


def rewrite_tag(path: Path, keyword: str, value) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.parametrize("fault", ["missing", "repeated", "uneven", "tilt", "orientation"])
def test_irregular_dicom_series_refused(small_ct, tmp_path, capsys, fault):
    """SimpleITK assembles any series into an evenly spaced stack, placing slices where they are not; such a
    series is refused in one line that names the fault, instead of scored on a wrong grid."""
    folder = tmp_path / fault
    files = write_dicom_series(small_ct[:, :, :12], folder)
    z0 = small_ct.TransformIndexToPhysicalPoint((0, 0, 0))
    if fault == "missing":  # a file lost in transfer
        files[5].unlink()
        expect = "slices 5 and 6 are 4 mm apart where the series' spacing is 2 mm (1 uneven gap(s)): a slice is missing"
    elif fault == "repeated":  # a second acquisition of one slice under the same series UID
        shutil.copy(files[5], folder / "repeat")
        rewrite_tag(folder / "repeat", "SOPInstanceUID", "1.2.3.4.5.6.7")
        expect = "lie at the same position"
    elif fault == "uneven":  # every slice from the 7th on 0.5 mm further
        for k, path in enumerate(files[6:], start=6):
            rewrite_tag(path, "ImagePositionPatient", [z0[0], z0[1], z0[2] + 2.0 * k + 0.5])
        expect = "slices 6 and 7 are 2.5 mm apart where the series' spacing is 2 mm"
    elif fault == "tilt":  # each slice 0.353 mm further posterior: 10 degrees of gantry tilt
        for k, path in enumerate(files):
            sideways = 2.0 * np.tan(np.radians(10)) * k
            rewrite_tag(path, "ImagePositionPatient", [z0[0], z0[1] + sideways, z0[2] + 2.0 * k])
        expect = "gantry tilt of 10.0 degrees"
    else:
        rewrite_tag(files[3], "ImageOrientationPatient", [1, 0, 0, 0, 0.96592583, 0.25881905])
        expect = "orientation changes within the series"
    detect_fails(folder, tmp_path, capsys, expect)


@pytest.mark.parametrize("corrupt", ["rle_first", "rle_middle", "jpeg_lossless", "jpeg2000"])
def test_corrupt_compressed_slice_is_one_line(small_ct, tmp_path, corrupt):
    """A slice whose compressed pixel data is corrupt. GDCM divides by zero on an RLE frame that declares no
    segment, which killed the process (SIGFPE, exit 136, no message) even while it listed the folder's series; its
    JPEG and JPEG 2000 decoders print their complaints straight onto stderr. Now: exit 2, one line that names the
    file or the decoder's complaint, nothing written, the input unchanged. Run as a real child process, so that a
    crash fails this test instead of the test run."""
    import pydicom
    from pydicom.encaps import encapsulate

    folder = tmp_path / corrupt
    files = write_dicom_series(small_ct[:, :, :6], folder)
    victim = files[0 if corrupt == "rle_first" else 3]
    ds = pydicom.dcmread(victim)
    ds.file_meta.TransferSyntaxUID = {"jpeg_lossless": pydicom.uid.JPEGLosslessSV1,
                                      "jpeg2000": pydicom.uid.JPEG2000Lossless}.get(corrupt, pydicom.uid.RLELossless)
    # an RLE header of zeros (no segment); for the JPEGs, bytes that are no JPEG stream
    ds.PixelData = encapsulate([bytes(64) if corrupt.startswith("rle") else bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(victim, enforce_file_format=True)
    before = digest(folder)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medanomaly.cli", "detect", str(folder), "-o", str(out)],
                          capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medanomaly: error:"), proc.stderr
    expect = {"rle_first": f"{victim.name} is corrupt: its RLE-compressed pixel data has no valid RLE header (0 se",
              "rle_middle": f"{victim.name} is corrupt: its RLE-compressed pixel data has no valid RLE header (0 se",
              "jpeg_lossless": "the decoder said: Not a JPEG file",
              "jpeg2000": "the decoder said:"}[corrupt]
    assert expect in lines[0] and "(0x" not in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert digest(folder) == before


def write_media(series: dict[str, sitk.Image], root: Path, tmp_path: Path,
                modalities: dict[str, str] | None = None) -> dict[str, Path]:
    """Exported media as a CD or a PACS download has it: DICOMDIR beside PATIENT/STUDY/SERIES folders (pydicom's
    FileSet). Returns each series' folder by its UID."""
    import pydicom
    from pydicom.fileset import FileSet

    media = FileSet()
    for uid, image in series.items():
        modality = (modalities or {}).get(uid, "CT")
        for k, file in enumerate(write_dicom_series(image, tmp_path / f"src-{uid}", modality=modality, series_uid=uid)):
            ds = pydicom.dcmread(file)
            ds.StudyID, ds.StudyDate, ds.StudyTime = "1", "20260101", "1200"
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            media.add(ds)
    media.write(root)
    folders = {}
    for uid in series:
        (first,) = {Path(i.path).parent for i in media.find(SeriesInstanceUID=uid)}
        folders[uid] = first
    return folders


def test_exported_media_folder_or_dicomdir(small_ct, tmp_path):
    """`detect` on exported media (its root, or its DICOMDIR): the one series below is read, with a note; with several
    the refusal says how many and what to give (or --series picks one). It said "no DICOM series found" before."""
    from medanomaly.errors import InputError
    from medanomaly.volumes import read_volume

    root = tmp_path / "media"
    (folder,) = write_media({"1.2.3.4": small_ct[:, :, :10]}, root, tmp_path).values()
    expected = read_volume(folder)
    for given in (root, root / "DICOMDIR"):
        volume = read_volume(given)
        assert volume.dicom_files == expected.dicom_files and volume.case_name == "media"
        assert np.array_equal(volume.hu, expected.hu) and volume.image.GetOrigin() == expected.image.GetOrigin()
        assert any("holds no DICOM series itself" in w and str(folder.relative_to(root)) in w for w in volume.warnings)

    two = tmp_path / "two"
    folders = write_media({"1.2.3.4": small_ct[:, :, :10], "1.2.3.5": small_ct[:, :, 10:16]}, two, tmp_path)
    with pytest.raises(InputError, match="no DICOM series in the folder itself, but 2 folders of CT below it"):
        read_volume(two)
    volume = read_volume(two, series="1.2.3.5")
    assert volume.series_uid == "1.2.3.5" and volume.dicom_files == read_volume(folders["1.2.3.5"]).dicom_files

    # beside a series that is not CT (a report's, an MR), the CT is the one read
    mixed = tmp_path / "mixed"
    folders = write_media({"1.2.3.4": small_ct[:, :, :10], "1.2.3.6": small_ct[:, :, 10:16]}, mixed, tmp_path,
                          modalities={"1.2.3.6": "MR"})
    volume = read_volume(mixed)
    assert volume.series_uid == "1.2.3.4" and volume.dicom_files == read_volume(folders["1.2.3.4"]).dicom_files
    with pytest.raises(InputError, match="no series '9.9' in the folder or in the 2 DICOM folder"):
        read_volume(mixed, series="9.9")


@pytest.mark.parametrize("kind", ["dicom", "nrrd", "mha"])
def test_volume_without_spacing_refused(small_ct, tmp_path, capsys, kind):
    """A header that gives no voxel spacing: a DICOM series without Pixel Spacing, a NRRD written from a bare array
    (pynrrd with no header), a MetaImage without ElementSpacing. ITK reads 1 mm for each, and every size, volume and
    position would have been wrong without a word (a 3.9 mm CT scored as a 1 mm one)."""
    import nrrd
    import pydicom

    if kind == "dicom":
        path = tmp_path / "series"
        for file in write_dicom_series(small_ct[:, :, :6], path):
            ds = pydicom.dcmread(file)
            del ds.PixelSpacing
            ds.save_as(file)
        expect = "the DICOM series gives no Pixel Spacing (0028,0030), so its pixel size is unknown"
    elif kind == "nrrd":
        path = tmp_path / "bare.nrrd"
        nrrd.write(str(path), sitk.GetArrayFromImage(small_ct).T.copy())
        expect = "the header gives no voxel spacing, so the voxel size is unknown"
    else:
        path = tmp_path / "bare.mha"
        sitk.WriteImage(small_ct, str(path))
        data = path.read_bytes()
        head, rest = data.split(b"ElementDataFile", 1)
        head = b"".join(line for line in head.splitlines(keepends=True) if not line.startswith(b"ElementSpacing"))
        path.write_bytes(head + b"ElementDataFile" + rest)
        expect = "the header gives no voxel spacing, so the voxel size is unknown"
    detect_fails(path, tmp_path, capsys, expect)


def test_regular_dicom_series_read_on_its_own_positions(small_ct, tmp_path):
    """The check passes a regular series in every stacking direction, and the grid read is the one written."""
    from medanomaly.volumes import read_volume

    for kind in ("lps", "ras", "flipped_z"):
        from conftest import reoriented

        image, _, _ = reoriented(small_ct[:, :, :12], kind)
        folder = tmp_path / kind
        write_dicom_series(image, folder)
        volume = read_volume(folder)
        np.testing.assert_allclose(volume.image.GetSpacing(), image.GetSpacing(), atol=1e-5)
        box = [(i, j, k) for i in (0, 127) for j in (0, 127) for k in (0, 11)]
        corners = {tuple(np.round(volume.image.TransformIndexToPhysicalPoint(c), 3)) for c in box}
        assert corners == {tuple(np.round(image.TransformIndexToPhysicalPoint(c), 3)) for c in box}


def test_sheared_nifti_refused_with_what_to_do(tmp_path, capsys):
    demo = nib.load(str(ROOT / "Testing" / "Data" / "chest_ct_demo.nii.gz"))
    affine = demo.affine.copy()
    affine[0, 1] = 0.3  # the rows slant: a shear no CT grid has
    sheared = nib.Nifti1Image(np.asarray(demo.dataobj), affine)
    sheared.set_qform(None, code=0)
    sheared.set_sform(affine, code=1)
    path = tmp_path / "sheared.nii.gz"
    nib.save(sheared, str(path))
    detect_fails(path, tmp_path, capsys, "orientation is not a rotation (sheared or skewed axes)")


def test_constant_volume(tmp_path, capsys):
    image = sitk.Image([32, 32, 8], sitk.sitkInt16) - 1000
    path = tmp_path / "constant.nrrd"
    sitk.WriteImage(image, str(path))
    detect_fails(path, tmp_path, capsys, "every voxel")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_volume(small_ct, tmp_path, capsys, bad):
    arr = sitk.GetArrayFromImage(small_ct).astype(np.float32)
    arr[3, 10, 10] = bad
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(small_ct)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(image, str(path))
    detect_fails(path, tmp_path, capsys, "NaN or infinite")


@pytest.mark.parametrize("spacing", [0.0, -2.0])
def test_zero_or_negative_spacing_nifti(small_ct, tmp_path, capsys, spacing):
    arr = sitk.GetArrayFromImage(small_ct).T
    img = nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.0, 1.0]))
    img.header["pixdim"][3] = spacing
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    path = tmp_path / "badspacing.nii"
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    pixdim = np.frombuffer(raw, dtype=np.float32, count=8, offset=76).copy()
    pixdim[3] = spacing
    raw[76:108] = pixdim.tobytes()
    path.write_bytes(bytes(raw))
    detect_fails(path, tmp_path, capsys, "spacing")


def test_zero_spacing_nrrd(small_ct_file, tmp_path, capsys):
    import nrrd

    data, header = nrrd.read(str(small_ct_file))
    directions = np.array(header["space directions"], dtype=float)
    directions[2] = 0.0
    header["space directions"] = directions
    path = tmp_path / "zero.nrrd"
    nrrd.write(str(path), data, header)
    detect_fails(path, tmp_path, capsys, "spacing")


def test_padding_outside_the_scan_circle_is_read_as_air(small_ct, default_model, tmp_path):
    """A scanner's padding value (-32768 outside the reconstruction circle) is no Hounsfield unit; such a CT is read
    with the padding as air and a warning, and detects exactly as the same CT padded with air does. Padding mixed
    with other values below any HU is still refused."""
    import medanomaly
    from medanomaly.errors import InputError
    from medanomaly.volumes import read_volume

    arr = sitk.GetArrayFromImage(small_ct).astype(np.int16)
    k, j, i = np.ogrid[:arr.shape[0], :arr.shape[1], :arr.shape[2]]
    outside = np.broadcast_to((j - arr.shape[1] / 2) ** 2 + (i - arr.shape[2] / 2) ** 2 > (0.5 * arr.shape[1]) ** 2,
                              arr.shape)
    cases = {}
    for name, value in (("padded", -32768), ("air", -1024)):
        image = sitk.GetImageFromArray(np.where(outside, value, arr).astype(np.int16))
        image.CopyInformation(small_ct)
        cases[name] = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(image, str(cases[name]))
    before = digest(cases["padded"])
    volume = read_volume(cases["padded"])
    (note,) = volume.warnings
    assert "hold -32768, a padding value" in note and f"{outside.mean():.1%}" in note
    assert volume.hu.min() >= -1024 and np.array_equal(volume.hu, read_volume(cases["air"]).hu)
    results = {name: medanomaly.detect_volume(read_volume(path), str(default_model), device="cpu")
               for name, path in cases.items()}
    assert np.array_equal(results["padded"].significance, results["air"].significance)
    assert digest(cases["padded"]) == before, "the input was modified"
    mixed = np.where(outside, -32768, arr).astype(np.int16)
    mixed[0, 0, 0] = -5000  # a second value below any HU: not padding
    image = sitk.GetImageFromArray(mixed)
    image.CopyInformation(small_ct)
    sitk.WriteImage(image, str(tmp_path / "mixed.nrrd"))
    with pytest.raises(InputError, match="outside any Hounsfield-unit range"):
        read_volume(tmp_path / "mixed.nrrd")


def test_values_not_hu(small_ct, tmp_path, capsys):
    arr = sitk.GetArrayFromImage(small_ct).astype(np.int32) + 1024  # stored values without the rescale
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(small_ct)
    path = tmp_path / "unsigned.nrrd"
    sitk.WriteImage(image, str(path))
    detect_fails(path, tmp_path, capsys, "--allow-non-hu")
    out = tmp_path / "allowed"
    code, _, err = run_cli(["-q", "detect", str(path), "-o", str(out), "--allow-non-hu",
                            "--model", str(ROOT / "models" / "chest-ct-vqvae-recon")], capsys)
    assert code == 0, err
    summary = json.loads((out / "unsigned" / "findings.json").read_text())
    assert summary["warnings"], "the non-HU warning must be recorded"


def test_volume_too_large_for_memory(small_ct_file, tmp_path, capsys):
    detect_fails(small_ct_file, tmp_path, capsys, "refused", "--max-memory-gb", "0.0001")


def test_dicom_series_too_large_is_refused_before_its_pixels_are_read(small_ct, tmp_path, capsys, monkeypatch):
    """The size comes from the first file's header and the number of files; a spy on SimpleITK's series reader
    counts the series read."""
    folder = tmp_path / "series"
    write_dicom_series(small_ct, folder)
    reads = []
    real = sitk.ImageSeriesReader.Execute
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", lambda self: reads.append(1) or real(self))
    detect_fails(folder, tmp_path, capsys, "128x128x24 voxels needs about", "--max-memory-gb", "0.0001")
    assert reads == [], "refused before the series was read"


def test_output_folder_not_writable(small_ct_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(["detect", str(small_ct_file), "-o", str(blocker / "out")], capsys)
    assert code != 0 and "not writable" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _copy_model(default_model, tmp_path) -> Path:
    copy = tmp_path / "model_copy"
    shutil.copytree(default_model, copy)
    return copy


def test_model_with_wrong_checksum(small_ct_file, default_model, tmp_path, capsys):
    model = _copy_model(default_model, tmp_path)
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    detect_fails(small_ct_file, tmp_path, capsys, "SHA-256", "--model", str(model))


@pytest.mark.parametrize("field,value,expect", [("min_software_version", "99.0.0", "upgrade"),
                                                ("card_format", 99, "format"),
                                                ("method", "no-such-method", "not known")])
def test_incompatible_model(small_ct_file, default_model, tmp_path, capsys, field, value, expect):
    model = _copy_model(default_model, tmp_path)
    card = json.loads((model / "model_card.json").read_text())
    card[field] = value
    (model / "model_card.json").write_text(json.dumps(card))
    detect_fails(small_ct_file, tmp_path, capsys, expect, "--model", str(model))


def test_invalid_model_card(small_ct_file, default_model, tmp_path, capsys):
    model = _copy_model(default_model, tmp_path)
    card = json.loads((model / "model_card.json").read_text())
    del card["calibration"]
    (model / "model_card.json").write_text(json.dumps(card))
    detect_fails(small_ct_file, tmp_path, capsys, "invalid", "--model", str(model))


def test_bad_flag_values(small_ct_file, tmp_path, capsys):
    detect_fails(small_ct_file, tmp_path, capsys, "sensitivity", "--sensitivity", "3")
    detect_fails(small_ct_file, tmp_path, capsys, "device", "--device", "tpu")


def test_real_child_process_reports_one_line(tmp_path):
    """The installed command, as a user runs it: one line on stderr, exit 2, and a traceback only with --debug."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))
    missing = str(tmp_path / "missing.nii.gz")
    cmd = [sys.executable, "-m", "medanomaly.cli", "detect", missing, "-o", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "medanomaly.cli", "--debug", *cmd[3:]], capture_output=True,
                           encoding="utf-8", errors="replace", env=env, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("failing", ["heatmap.nrrd", "labels.nrrd"])
@pytest.mark.parametrize("threads", [1, 2])  # one core: written in this thread (api.side_executor); more: in threads
def test_a_write_that_fails_leaves_nothing(small_ct_file, default_model, tmp_path, capsys, monkeypatch, request,
                                           failing, threads):
    """Running out of space while the images are written, at the first or a later image, gives one line and no case
    or staging folder."""
    import medanomaly.api as api

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    request.addfinalizer(lambda: torch.set_num_threads(before))
    assert isinstance(api.side_executor(2), ThreadPoolExecutor) == (threads > 1)

    real = api.write_image

    def write_image(array, reference, path, *args, **kwargs):
        if Path(path).name == failing:
            raise OSError(28, "No space left on device")
        return real(array, reference, path, *args, **kwargs)

    monkeypatch.setattr(api, "write_image", write_image)
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "detect", str(small_ct_file), "-o", str(out), "--model", str(default_model)],
                           capsys)
    assert_clean_failure(code, err, out, "writing results failed (No space left on device)")


def test_a_file_name_the_locale_cannot_decode_is_one_line(demo_image, tmp_path):
    """Under an ASCII locale (without Python's UTF-8 mode) a non-ASCII file name reaches Python as undecodable
    bytes, which SimpleITK's path conversion turns into an abort: refused with one line instead, nothing written."""
    name = "M\u00fcller.nii.gz".encode("utf-8")
    folder = os.fsencode(str(tmp_path))
    sitk.WriteImage(demo_image[:, :, :8], str(tmp_path / "plain.nii.gz"))
    shutil.copy(os.path.join(folder, b"plain.nii.gz"), os.path.join(folder, name))
    env = dict(os.environ, PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LC_ALL="C", LANG="C",
               PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))
    run = subprocess.run([sys.executable, "-m", "medanomaly.cli", "detect", os.path.join(folder, name), "-o",
                          os.path.join(folder, b"out")], env=env, capture_output=True, timeout=300)
    stderr = run.stderr.decode("ascii", "backslashreplace")
    assert run.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("medanomaly: error:")
    assert "locale" in stderr and "UTF-8" in stderr
    out = os.path.join(folder, b"out")
    assert not os.path.exists(out) or os.listdir(out) == [], "nothing half-written"
    # the same for an output folder whose name the locale cannot decode, given a readable input
    run = subprocess.run([sys.executable, "-m", "medanomaly.cli", "detect", str(tmp_path / "plain.nii.gz"), "-o",
                          os.path.join(folder, name + b"-out")], env=env, capture_output=True, timeout=300)
    stderr = run.stderr.decode("ascii", "backslashreplace")
    assert run.returncode != 0 and run.returncode != -6 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "locale" in stderr
    assert not os.path.exists(os.path.join(folder, name + b"-out"))
