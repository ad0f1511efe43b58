"""Reading CT volumes (NIfTI, NRRD, MetaImage, DICOM folders) through SimpleITK, and refusing what is not a usable CT."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError, exception_line

log = logging.getLogger(__name__)
# ITK prints reader warnings straight to the terminal; our own checks report what matters in one line.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Bytes of working memory per input voxel during detection: the int16 input, the float32 heatmap, the component
# labels and the masks (measured peak on the 512x512x141 chest CT, rounded up).
WORKING_BYTES_PER_VOXEL = 16
# Air is about -1000 HU and every CT of a body contains some; outside these bounds values cannot be Hounsfield units.
HU_FLOOR, HU_CEILING = -3100.0, 40000.0
AIR_EXPECTED_BELOW_HU = -200.0
# A share of the body outside a model's field of view that is worth a warning (detect) and a note (a batch's report)
COVERAGE_WARN_SHARE = 0.001


@dataclass
class CTVolume:
    """A CT volume as read: the SimpleITK image carries the geometry outputs must copy; `hu` is a [k, j, i] view."""

    image: sitk.Image
    hu: np.ndarray
    source: str
    case_name: str
    series_uid: str | None = None
    warnings: list[str] = field(default_factory=list)
    dicom_files: list[str] | None = None  # the DICOM series' files, when read from a folder (for a DICOM SEG)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.image.GetSpacing())

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.image.GetSpacing()))


# One DICOM series of a folder that holds several, as one input: "FOLDER [series UID]" (what `batch --each-series`
# and a manifest's series column make, and what summary.csv lists; read_volume and detect take it too)
_SERIES_INPUT = re.compile(r"^(?P<folder>.+) \[series (?P<uid>[0-9.]+)\]$")


def series_input(folder: str | os.PathLike, uid: str) -> str:
    return f"{folder} [series {uid}]"


def split_series_input(path: str | os.PathLike) -> tuple[str, str | None]:
    """(folder, series UID) of a series input whose folder exists; (path, None) for anything else."""
    match = _SERIES_INPUT.match(str(path))
    if match and os.path.isdir(match["folder"]):
        return match["folder"], match["uid"]
    return str(path), None


def case_name_for(path: str | os.PathLike) -> str:
    """The output folder name of a case: the file name without its image (or .dcm) suffix, or the DICOM folder's
    name (with the series UID for one series of a folder; for a DICOMDIR, the folder it indexes)."""
    folder, uid = split_series_input(path)
    if uid is not None:
        return f"{Path(folder).name}-series-{uid}"
    name = Path(path).name
    if is_dicomdir(Path(path)):  # exported media's index: the case is the media's folder
        return Path(path).resolve().parent.name
    for suffix in (*VOLUME_SUFFIXES, ".dcm"):  # a multi-frame DICOM file's too
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def available_memory_bytes() -> int:
    """Memory the operating system can give us now (MemAvailable), or a conservative 4 GiB where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def warn(warnings: list[str], where: str | os.PathLike, text: str) -> None:
    """Record a warning with the result (findings.json) and log it with where it comes from."""
    warnings.append(text)
    log.warning("%s: %s", where, text)


def is_dicomdir(path: Path) -> bool:
    """The index of exported media (its images lie in the folders below it), not an image of a series."""
    return path.name.upper() == "DICOMDIR"


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


# files of a folder whose first bytes are read to tell a DICOM folder (not one file only: a folder of DICOM files
# may also hold a stray text file or an index)
DICOM_PROBE_FILES = 5


def is_dicom_folder(folder: Path) -> bool:
    """A folder of DICOM files (a series, or several), told from its files' names and first bytes only."""
    # hidden files (.DS_Store, say) and a DICOMDIR are no images of a series
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not is_dicomdir(p))
    if not files or any(p.name.lower().endswith(VOLUME_SUFFIXES) for p in files):
        return False
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    return any(has_dicom_preamble(path) for path in files[:DICOM_PROBE_FILES])


def dicom_folders_below(folder: Path) -> list[Path]:
    """The DICOM folders inside a folder, at any depth (exported media: DICOMDIR beside PATIENT/STUDY/SERIES
    folders), in a stable order."""
    found = []
    for root, dirs, _ in os.walk(folder):
        dirs.sort()
        if Path(root) != folder and is_dicom_folder(Path(root)):
            found.append(Path(root))
    return found


def _unread_dicom_files(folder: Path, series: list["DicomSeries"]) -> int:
    """DICOM files of the folder in no series GDCM could read (it leaves truncated files out without a word)."""
    listed = {Path(f).name for s in series for f in s.files}
    return sum(1 for p in folder.iterdir()
               if p.is_file() and p.name not in listed and not is_dicomdir(p) and has_dicom_preamble(p))


class DicomSeries(NamedTuple):
    uid: str
    files: list[str]
    modality: str
    description: str
    size: tuple[int, int, int]  # (columns, rows, slices) from the first file's header and the number of files
    pixel_spacing: bool  # whether the first file's header gives the pixel spacing (GDCM assumes 1 mm if not)

    @property
    def is_ct(self) -> bool:  # a series without a modality is taken for CT; the HU checks judge it
        return self.modality in ("CT", "")

    @property
    def is_multiframe(self) -> bool:  # an enhanced CT object: one file holds many slices (frames)
        return self.size[2] > len(self.files)


def dicom_series(folder: Path) -> list[DicomSeries]:
    """Every series GDCM finds in a folder, whatever the suffixes (only the first file of each is read). A corrupt
    RLE file, on which GDCM's scan of the folder would kill the process, is refused first."""
    _refuse_corrupt_rle(folder, [str(p) for p in sorted(folder.iterdir()) if p.is_file() and not is_dicomdir(p)])
    with _stderr_captured(folder):
        try:
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError:
            uids = ()
        listed = [list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids]
    series = []
    for uid, files in zip(uids, listed):
        try:
            series.append(_describe_series(files, uid))
        except (IndexError, UnreadableHeader):  # no file, or the first unreadable
            continue
    return series


class UnreadableHeader(Exception):
    """A DICOM file whose header cannot be read as an image's."""


def _describe_series(files: list[str], uid: str | None = None) -> DicomSeries:
    """A series from its files (only the first one's header is read, by pydicom: GDCM's header reader decodes an RLE
    frame's header and divides by zero on a corrupt one; the UID from it unless given). Raises UnreadableHeader
    where that header cannot be read or describes no image."""
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
        text = lambda keyword: str(ds.get(keyword) or "").strip()  # noqa: E731
        size = (int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames") or 1) * len(files))
        measures = functional_group(ds, 0, "PixelMeasuresSequence")  # an enhanced object's
        spacing = bool(ds.get("PixelSpacing") or (measures is not None and measures.get("PixelSpacing")))
    except Exception as exc:  # pydicom raises many kinds on a file that is not DICOM or not an image
        raise UnreadableHeader(exception_line(exc)) from None
    return DicomSeries(uid if uid is not None else text("SeriesInstanceUID"), files, text("Modality").upper(),
                       text("SeriesDescription"), size, spacing)


def _check_pixel_spacing(where: Path, series: DicomSeries) -> None:
    """A CT series must state its pixel size: without Pixel Spacing GDCM reads 1 mm, and every size, volume and
    position derived from it would be wrong without a word."""
    if not series.pixel_spacing:
        raise InputError(f"{where}: the DICOM series gives no Pixel Spacing (0028,0030), so its pixel size is "
                         "unknown; export it with its spacing (a CT series always has one)")


RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _refuse_corrupt_rle(where: Path, files: list[str]) -> None:
    """Refuse a series with an RLE-compressed file whose frame declares no segment (or more than DICOM allows):
    GDCM divides by zero on it and the process dies. Only RLE files are read beyond their file meta."""
    import pydicom
    from pydicom.encaps import generate_frames

    for path in files:
        try:
            if pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID") != RLE_LOSSLESS:
                continue
            ds = pydicom.dcmread(path, force=True)
            frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
        except Exception:  # unreadable here: GDCM's own reading reports it
            continue
        for frame in frames:  # an RLE header: the number of segments (1-15), then their offsets, the first 64
            segments = int.from_bytes(frame[:4], "little") if len(frame) >= 64 else 0
            if not 1 <= segments <= 15 or int.from_bytes(frame[4:8], "little") != 64:
                raise InputError(f"{where}: {Path(path).name} is corrupt: its RLE-compressed pixel data has no valid "
                                 f"RLE header ({segments} segments declared); replace that file, or export the "
                                 "series again")


@contextlib.contextmanager
def _stderr_captured(where: str | os.PathLike):
    """What libraries print on stderr while reading `where`, captured instead of shown and logged at debug level:
    GDCM's JPEG and JPEG 2000 decoders print a line per attempt on a corrupt slice (from C, on the process's
    stderr), and highdicom prints a traceback before it raises on a frame it cannot decode (on sys.stderr). The list
    it yields holds those lines after the block; our one-line error is what the user sees."""
    lines: list[str] = []
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a windowed process): nothing to keep clean at the descriptor level
        saved = None
    python_text = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        if saved is not None:
            os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_text):
                yield lines
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace") + python_text.getvalue()
            lines.extend(line for line in text.splitlines() if line.strip())
            for line in lines:
                log.debug("while reading %s: %s", where, line)


def _series_below(folder: Path, series_uid: str | None, notes: list[str]) -> tuple[Path, list[DicomSeries]]:
    """For a folder without a series of its own (exported media: DICOMDIR beside PATIENT/STUDY/SERIES folders), the
    one folder below that holds a CT series (or the series asked for) and its series, with a note; (folder, []) where
    there is no DICOM folder below. More than one such folder, or none with CT, is refused with what to give."""
    below = {f: dicom_series(f) for f in dicom_folders_below(folder)}
    wanted = (lambda s: s.uid == series_uid) if series_uid is not None else (lambda s: s.is_ct)  # noqa: E731
    candidates = [f for f, held in below.items() if any(map(wanted, held))]
    if below and not candidates:
        asked = f"series {series_uid!r}" if series_uid is not None else "CT series"
        raise InputError(f"{folder}: no {asked} in the folder or in the {len(below)} DICOM folder(s) below it; "
                         "medanomaly needs CT in Hounsfield units")
    if len(candidates) > 1:
        raise InputError(f"{folder}: no DICOM series in the folder itself, but {len(candidates)} folders of CT below "
                         f"it (such as {candidates[0].relative_to(folder)}); give one of them (or --series UID), or "
                         "run `medanomaly batch` on this folder for every series")
    if not candidates:
        return folder, []
    warn(notes, folder, f"the folder holds no DICOM series itself; the folder of DICOM files below it, "
                        f"{candidates[0].relative_to(folder)}, was examined")
    return candidates[0], below[candidates[0]]


def _read_dicom(folder: Path, series_uid: str | None, max_bytes: int) -> tuple[sitk.Image, str, list[str], list[str]]:
    """The series' image, UID and files (in the order read), and notes about the choice of series. A series too large
    for `max_bytes` is refused from its first file's header, before any pixel is read."""
    notes: list[str] = []
    series = dicom_series(folder)
    if not series:  # exported media, say: the series lie in folders below
        folder, series = _series_below(folder, series_uid, notes)
    if not series:
        raise InputError(f"{folder}: no DICOM series found; point to a folder of DICOM files or to a NIfTI/NRRD/MHA "
                         "file")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            known = ", ".join(repr(s.uid) for s in series)
            raise InputError(f"{folder}: no series with UID {series_uid!r}; the folder holds {known}")
        chosen = chosen[0]
        if not chosen.is_ct:
            raise InputError(f"{folder}: series {chosen.uid!r} is {chosen.modality}, not CT; medanomaly needs CT in "
                             "Hounsfield units")
    else:
        ct = [s for s in series if s.is_ct]
        if not ct:
            kinds = ", ".join(sorted({s.modality for s in series}))
            raise InputError(f"{folder}: no CT series (found modality {kinds}); medanomaly needs CT in Hounsfield "
                             "units")
        chosen = max(ct, key=lambda s: s.size[2])  # the most slices, whether files or frames of one
        if len(series) > 1:
            warn(notes, folder, f"the folder holds {len(series)} series; CT series {chosen.uid!r} "
                                f"({chosen.size[2]} slices, {chosen.description or 'no description'}) was examined, "
                                "the others were not (choose with --series UID, or give each series its own folder)")
    unread = _unread_dicom_files(folder, series)
    if unread:
        warn(notes, folder, f"{unread} DICOM file(s) of the folder are in no series that could be read (truncated, "
                            "or not images, such as a dose report) and were not examined; if they belong to this "
                            "series, it is incomplete")
    _check_pixel_spacing(folder, chosen)
    _check_memory(chosen.size, folder, max_bytes)
    if chosen.is_multiframe:
        return read_multiframe(folder, chosen.files), chosen.uid, chosen.files, notes
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(chosen.files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's own position, for the check below
    failure = None
    with _stderr_captured(folder) as decoder_lines:
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            failure = _first_line(exc)
    if failure is not None:
        said = f"; the decoder said: {decoder_lines[-1].strip()}" if decoder_lines else ""
        raise InputError(f"{folder}: the DICOM series could not be read ({failure}{said}); check that it is complete "
                         "and not corrupt")
    check_slice_positions(folder, [_numbers(reader, k, "0020|0032") for k in range(len(chosen.files))],
                          [_numbers(reader, k, "0020|0037") for k in range(len(chosen.files))])
    return image, chosen.uid, chosen.files, notes


def _read_dicom_file(path: Path, max_bytes: int) -> tuple[sitk.Image, str, list[str]]:
    """One DICOM file given as the input: a multi-frame CT object is read whole; a single slice is refused."""
    try:
        series = _describe_series([str(path)])
    except UnreadableHeader as exc:
        raise InputError(f"{path}: not a readable DICOM image ({exc}); give a DICOM folder or a NIfTI/NRRD/MetaImage "
                         "file") from None
    if not series.is_multiframe:
        raise InputError(f"{path}: a single DICOM slice; give the folder that holds the whole series")
    if not series.is_ct:
        raise InputError(f"{path}: the file is {series.modality}, not CT; medanomaly needs CT in Hounsfield units")
    _check_pixel_spacing(path, series)
    _check_memory(series.size, path, max_bytes)
    return read_multiframe(path, series.files), series.uid, series.files


def _numbers(reader: sitk.ImageSeriesReader, k: int, key: str) -> list[float] | None:
    """A DICOM decimal-string tag of slice k as numbers (None where it is absent or unreadable)."""
    if not reader.HasMetaDataKey(k, key):
        return None
    try:
        return [float(v) for v in reader.GetMetaData(k, key).split("\\")]
    except ValueError:
        return None


# How far a slice gap may differ from the series' typical one, and a slice's offset from the slice normal: scanners
# round positions to about 0.001 mm, and a missing slice, repeated slice or gantry tilt is far larger.
SLICE_GAP_TOLERANCE_MM = 0.01
SLICE_GAP_TOLERANCE_SHARE = 0.01


def check_slice_positions(folder: Path, positions: list, orientations: list, numbers: list[int] | None = None,
                          noun: str = "slices") -> None:
    """Refuse a DICOM series whose slices (in the order read) do not make one evenly spaced stack along their normal:
    a missing or repeated slice, uneven spacing, gantry tilt or orientation that changes. SimpleITK would assemble
    any of them into a regular grid anyway, with slices at positions they do not have.
    A series without positions or orientations is left to the reader. Messages name slice k as numbers[k] (default
    k + 1) and call the slices `noun` (the frames of a multi-frame file)."""
    numbers = numbers or list(range(1, len(positions) + 1))
    if len(positions) < 2 or any(p is None or len(p) != 3 for p in positions) \
            or any(o is None or len(o) != 6 for o in orientations):
        return
    orientation = np.asarray(orientations, float)
    if np.abs(orientation - orientation[0]).max() > 1e-3:
        raise InputError(f"{folder}: the {noun}' orientation changes within the series (a localizer among them?); "
                         f"give a series of parallel {noun} only")
    normal = np.cross(orientation[0, :3], orientation[0, 3:])
    positions = np.asarray(positions, float)
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    gap = float(np.median(np.abs(along)))
    tolerance = max(SLICE_GAP_TOLERANCE_MM, SLICE_GAP_TOLERANCE_SHARE * gap)
    if np.diff(np.sort(positions @ normal)).min() <= tolerance:
        raise InputError(f"{folder}: two {noun} lie at the same position; the series holds a repeated slice or two "
                         "acquisitions (or phases), give one acquisition per folder")
    if np.any(np.sign(along) != np.sign(along[0])):
        raise InputError(f"{folder}: the {noun} are not in order along their normal; give one acquisition per "
                         "folder")
    uneven = np.abs(np.abs(along) - gap) > tolerance
    if np.any(uneven):
        k = int(np.argmax(np.abs(np.abs(along) - gap)))
        raise InputError(f"{folder}: {noun} {numbers[k]} and {numbers[k + 1]} are {abs(along[k]):.3g} mm apart where "
                         f"the series' spacing is {gap:.3g} mm ({int(uneven.sum())} uneven gap(s)): a slice is missing "
                         "or the spacing varies; complete the series, or resample it to even spacing")
    across = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if np.any(across > tolerance):
        tilt = float(np.degrees(np.arctan2(across.max(), gap)))
        raise InputError(f"{folder}: each slice is offset {across.max():.3g} mm sideways from the one before (gantry "
                         f"tilt of {tilt:.1f} degrees); resample the series to an orthogonal grid first, such as "
                         "3D Slicer's DICOM acquisition geometry regularization")


def functional_group(dataset, frame: int, sequence: str):
    """The item of a functional-group sequence that holds for one frame of an enhanced DICOM object: the frame's own,
    else the one shared by every frame (None if neither has it)."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    shared = dataset.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[frame] if per_frame else None, shared[0] if shared else None):
        items = group.get(sequence) if group is not None else None
        if items:
            return items[0]
    return None


def _as_int16_if_whole(array: np.ndarray) -> np.ndarray:
    """A float volume of whole HU within int16 as int16 (as a single-frame series is read), converted slice by slice
    so that no second float copy is held; else the array as it is."""
    info = np.iinfo(np.int16)
    for plane in array:
        if not (np.isfinite(plane).all() and info.min <= plane.min() and plane.max() <= info.max
                and np.array_equal(plane, np.round(plane))):
            return array
    out = np.empty(array.shape, np.int16)
    for k, plane in enumerate(array):
        out[k] = plane
    return out


def read_multiframe(where: Path, files: list[str]) -> sitk.Image:
    """A multi-frame (enhanced) CT object: each frame placed by its own position and scaled to HU by its own rescale
    (highdicom), in the order of the frames' positions whatever the order they are stored in. SimpleITK (GDCM) alone
    applies one frame's rescale to every frame and misplaces frames stored out of spatial order; a folder holding
    such a file it reads as a 4D image. Frames that do not make one evenly spaced stack are refused as a series'
    slices are (check_slice_positions)."""
    if len(files) > 1:
        raise InputError(f"{where}: the series is stored in {len(files)} multi-frame files, which medanomaly does not "
                         "join; give one multi-frame file, or convert the series to NIfTI first (dcm2niix, 3D Slicer)")
    try:
        import highdicom as hd
    except ImportError:
        raise InputError(f"{where}: reading a multi-frame (enhanced) DICOM CT needs highdicom (pip install "
                         "highdicom)") from None
    try:
        image = hd.imread(files[0], lazy_frame_retrieval=True)
        frames = int(image.get("NumberOfFrames", 1))
        positions, orientations = [], []
        for frame in range(frames):
            plane = functional_group(image, frame, "PlanePositionSequence")
            orientation = functional_group(image, frame, "PlaneOrientationSequence")
            positions.append([float(v) for v in plane.ImagePositionPatient] if plane else None)
            orientations.append([float(v) for v in orientation.ImageOrientationPatient] if orientation else None)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as exc:
        raise InputError(f"{where}: the multi-frame DICOM file could not be read ({exception_line(exc)}); check "
                         "that it is complete") from None
    if any(p is None for p in positions) or any(o is None for o in orientations):
        raise InputError(f"{where}: the multi-frame DICOM file gives no position or orientation for some frames, so "
                         "its slices cannot be placed; export the series with its geometry")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    order = np.argsort(np.asarray(positions) @ normal, kind="stable")
    check_slice_positions(where, [positions[k] for k in order], [orientations[k] for k in order],
                          numbers=[int(k) + 1 for k in order], noun="frames")
    try:  # HU: the modality transform (rescale) of each frame, not a real-world value map or a display window
        with _stderr_captured(where):
            volume = image.get_volume(dtype=np.float32, apply_modality_transform=True,
                                      apply_real_world_transform=False)
    except (RuntimeError, ValueError, KeyError, AttributeError, OSError) as exc:
        raise InputError(f"{where}: the multi-frame DICOM file's frames could not be read as one volume "
                         f"({exception_line(exc)})") from None
    array = _as_int16_if_whole(volume.array)
    columns = volume.affine[:3, 2::-1]  # highdicom indexes (slice, row, column); SimpleITK's axes are i, j, k
    spacing = np.linalg.norm(columns, axis=0)
    result = sitk.GetImageFromArray(np.ascontiguousarray(array))
    result.SetSpacing(tuple(float(v) for v in spacing))
    result.SetOrigin(tuple(float(v) for v in volume.affine[:3, 3]))
    result.SetDirection(tuple(float(v) for v in (columns / spacing).ravel()))
    return result


def _first_line(exc: Exception) -> str:
    """The useful sentence of an ITK exception: the text after 'ERROR:' without the source-file banner."""
    text = " ".join(str(exc).split())
    for marker in ("sitk::ERROR:", "itk::ERROR:", "ERROR:"):
        if marker in text:
            text = text.split(marker)[-1]
            break
    text = re.sub(r"\(0x[0-9a-fA-F]+\)", "", text.split("Description:")[-1]).strip()  # no object addresses
    return (text or type(exc).__name__)[:200]


def _nifti_pixdim(path: Path) -> list[float] | None:
    """pixdim[1..3] of a NIfTI-1/2 header read from the raw bytes: nibabel and ITK both replace a zero spacing by 1
    and ITK silently makes a negative one positive, so the header must be read before they see it."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            ndim = struct.unpack(endian + "h", head[40:42])[0]
            return list(struct.unpack(endian + "8f", head[76:108]))[1:1 + min(3, max(ndim, 0))]
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            ndim = struct.unpack(endian + "q", head[16:24])[0]
            return list(struct.unpack(endian + "8d", head[104:168]))[1:1 + min(3, max(ndim, 0))]
    return None


# How far (mm, at the volume's corners) a NIfTI header's qform and sform may disagree before detect says which it used
NIFTI_TRANSFORMS_AGREE_MM = 0.1


def _nifti_transform_note(path: Path, image: sitk.Image) -> str | None:
    """A note where a NIfTI header holds both a qform and an sform that place the voxels differently: which one the
    volume was read with (as ITK, and so 3D Slicer, reads it; the outputs follow it) and by how much they differ,
    since another tool that takes the other one puts the findings elsewhere."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        (qform, qcode), (sform, scode) = header.get_qform(coded=True), header.get_sform(coded=True)
    except Exception:  # noqa: BLE001 - the image was read; a header nibabel cannot parse gets no note
        return None
    if not qcode or not scode:
        return None
    size = np.array(image.GetSize()) - 1
    corners = np.array([[i, j, k, 1] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], float).T
    lps = np.diag([-1, -1, 1, 1])  # NIfTI's transforms are RAS
    placed = {name: (lps @ affine @ corners)[:3] for name, affine in (("qform", qform), ("sform", sform))}
    apart = float(np.linalg.norm(placed["qform"] - placed["sform"], axis=0).max())
    if apart <= NIFTI_TRANSFORMS_AGREE_MM:
        return None
    read = np.array([image.TransformContinuousIndexToPhysicalPoint(c[:3].tolist()) for c in corners.T]).T
    used = min(placed, key=lambda name: float(np.abs(placed[name] - read).max()))
    other = "sform" if used == "qform" else "qform"
    return (f"the NIfTI header's qform and sform place the voxels up to {apart:.1f} mm apart; the volume was read "
            f"with its {used} (as ITK and 3D Slicer read it) and the outputs follow it, so a tool that uses the "
            f"{other} shows them shifted")


def _header_spacing(path: Path) -> list[float] | None:
    """Spacing as the file's own header states it, before any reader normalizes it: [] where a NRRD or MetaImage
    header states none, None where it cannot be told."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_pixdim(path)
        if name.endswith((".nrrd", ".nhdr")):
            import nrrd

            header = nrrd.read_header(str(path))
            if "space directions" in header:
                vectors = [np.asarray(v, dtype=float) for v in header["space directions"] if v is not None]
                return [float(np.linalg.norm(v)) for v in vectors if v.ndim == 1 and np.all(np.isfinite(v))]
            if "spacings" in header:
                return [float(v) for v in header["spacings"]]
            return []  # no spacing at all: ITK would read 1 mm
        if name.endswith((".mha", ".mhd")):
            with open(path, "rb") as f:  # the text header, up to the pixel data
                lines = f.read(65536).split(b"ElementDataFile")[0].decode("latin-1").splitlines()
            fields = {line.split("=")[0].strip(): line.split("=", 1)[1].split() for line in lines if "=" in line}
            spacing = fields.get("ElementSpacing") or fields.get("ElementSize")
            return [float(v) for v in spacing] if spacing else []
    except Exception:  # an unreadable header is reported by SimpleITK's own reading
        return None
    return None


def _check_gzip_complete(path: Path) -> None:
    """ITK reads a truncated .gz silently (the missing voxels come back as zeros), so check the stream's end."""
    import zlib

    stream = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                stream.decompress(chunk, 0)
                if stream.eof:
                    break
    except zlib.error as exc:
        raise InputError(f"{path}: compressed data is corrupt ({exc}); re-export or re-copy the file") from None
    if not stream.eof:
        raise InputError(f"{path}: compressed data ends early: the file is truncated; re-copy it")


def _check_header(reader: sitk.ImageFileReader, path: Path, max_memory_bytes: int) -> None:
    dim = reader.GetDimension()
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: image has {reader.GetNumberOfComponents()} components per voxel; "
                         "give a single-channel (grayscale) CT volume")
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InputError(f"{path}: image is 2D ({'x'.join(map(str, size))}); give a 3D CT volume")
    if dim != 3:
        raise InputError(f"{path}: image is {dim}D; give a single 3D CT volume (split time series first)")
    _check_memory(size, path, max_memory_bytes)


def _check_memory(size, path, max_memory_bytes: int) -> None:
    needed = int(np.prod(size, dtype=np.float64)) * WORKING_BYTES_PER_VOXEL
    if needed > max_memory_bytes:
        raise InputError(
            f"{path}: volume of {'x'.join(map(str, size))} voxels needs about {needed / 2**30:.1f} GiB but "
            f"{max_memory_bytes / 2**30:.1f} GiB are allowed; refused (not streamed): crop or downsample it first, "
            "or raise --max-memory-gb")


def check_path_encoding(path: str | os.PathLike, error: type[Exception]) -> None:
    """Raise `error` with one line when `path` holds bytes that the locale could not decode. SimpleITK takes paths as
    UTF-8, and such a path (a non-ASCII name under an ASCII locale) aborts the whole process inside ITK."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{ascii(str(path))}: the path holds characters this machine's locale "
                    f"({sys.getfilesystemencoding()}) cannot decode; run with a UTF-8 locale (for example "
                    "LANG=C.UTF-8 or PYTHONUTF8=1) or rename it") from None


def read_volume(path: str | os.PathLike, *, series: str | None = None, allow_non_hu: bool = False,
                max_memory_gb: float | None = None) -> CTVolume:
    """Read one CT volume and check that it is a usable 3D CT in HU; raises InputError with a one-line message.

    Args:
        path: a NIfTI/NRRD/MetaImage file or a DICOM folder (files need no `.dcm` suffix), or "FOLDER [series UID]"
            for one series of a folder (series_input).
        series: DICOM SeriesInstanceUID to read when a folder holds several series (instead of the path's).
        allow_non_hu: warn instead of refusing values that cannot be Hounsfield units.
        max_memory_gb: refuse volumes whose processing would need more; default: 80% of available memory.
    """
    given = path
    if series is None:
        path, series = split_series_input(path)
    path = Path(path)
    max_bytes = int(max_memory_gb * 2**30) if max_memory_gb else int(0.8 * available_memory_bytes())
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    check_path_encoding(path, InputError)
    series_uid = dicom_files = None
    notes: list[str] = []
    if is_dicomdir(path):  # the index of exported media: its series lie in the folders beside it
        path = path.parent
    if path.is_dir():
        image, series_uid, dicom_files, notes = _read_dicom(path, series, max_bytes)
        _check_memory(image.GetSize(), path, max_bytes)  # as read (the first file's header may have undersold it)
    elif has_dicom_preamble(path):
        image, series_uid, dicom_files = _read_dicom_file(path, max_bytes)
    else:
        spacing = _header_spacing(path)
        if spacing == []:
            raise InputError(f"{path}: the header gives no voxel spacing, so the voxel size is unknown (ITK would "
                             "read 1 mm); write the volume with its spacing")
        if spacing is not None and (not np.all(np.isfinite(spacing)) or any(v <= 0 for v in spacing)):
            raise InputError(f"{path}: voxel spacing {tuple(round(v, 6) for v in spacing)} in the header is not "
                             "positive; fix the header's spacing")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            if "orthonormal" in str(exc):  # ITK's NIfTI reader: a sheared or scaled orientation in the header
                raise InputError(f"{path}: the header's orientation is not a rotation (sheared or skewed axes), "
                                 "which ITK cannot place on a grid; resample the volume onto an orthogonal grid "
                                 "first") from None
            raise InputError(f"{path}: not a readable image ({_first_line(exc)}); "
                             "give a NIfTI, NRRD or MetaImage file or a DICOM folder") from None
        _check_header(reader, path, max_bytes)
        if path.name.lower().endswith(".gz"):
            _check_gzip_complete(path)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{path}: image data could not be read ({_first_line(exc)}); "
                             "the file may be truncated or corrupt") from None
        note = _nifti_transform_note(path, image)
        if note:
            warn(notes, path, note)
    volume = CTVolume(image=image, hu=sitk.GetArrayViewFromImage(image), source=str(path),
                      case_name=case_name_for(given), series_uid=series_uid, dicom_files=dicom_files,
                      warnings=notes)
    validate_volume(volume, allow_non_hu=allow_non_hu)
    return volume


def volume_from_image(image: sitk.Image, *, name: str = "volume", allow_non_hu: bool = False) -> CTVolume:
    """Wrap an in-memory SimpleITK image (for example from Slicer) and apply the same checks as for a file."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: give a single-channel 3D CT volume")
    volume = CTVolume(image=image, hu=sitk.GetArrayViewFromImage(image), source=name, case_name=name)
    validate_volume(volume, allow_non_hu=allow_non_hu)
    return volume


# Scanners mark the voxels outside their reconstruction circle with a padding value (DICOM's Pixel Padding Value),
# often far below any Hounsfield unit (-32768); they hold no tissue and are read as air.
PADDING_AS_HU = -1024


def _padding_as_air(volume: CTVolume, lo: float) -> float:
    """Where every voxel below HU_FLOOR holds the one lowest value, a padding value, those voxels become air
    (PADDING_AS_HU) in the volume's image (the file is untouched), with a warning; returns the new lowest value.
    Anything else below HU_FLOOR is left for the HU check to refuse."""
    padded = volume.hu == volume.hu.dtype.type(lo)
    rest_lo = float(volume.hu[~padded].min()) if not padded.all() else lo
    if rest_lo < HU_FLOOR:
        return lo
    array = sitk.GetArrayFromImage(volume.image)  # a copy
    array[padded] = PADDING_AS_HU
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(volume.image)
    volume.image, volume.hu = image, sitk.GetArrayViewFromImage(image)
    warn(volume.warnings, volume.source, f"{padded.mean():.1%} of the voxels hold {lo:g}, a padding value (no "
                                         f"tissue, outside the scanner's field of view), and were read as air "
                                         f"({PADDING_AS_HU} HU)")
    return min(rest_lo, PADDING_AS_HU)


def validate_volume(volume: CTVolume, *, allow_non_hu: bool = False) -> None:
    """Geometry and value checks shared by every way a volume enters the pipeline."""
    image, src = volume.image, volume.source
    if min(image.GetSize()) < 2:
        raise InputError(f"{src}: image is 2D ({'x'.join(map(str, image.GetSize()))}); give a 3D CT volume")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{src}: voxel spacing {tuple(spacing)} is not positive; fix the header's spacing")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputError(f"{src}: the direction matrix is not a rotation; fix the header's orientation")
    hu = volume.hu
    if hu.dtype.kind == "f" and not np.isfinite(hu).all():
        raise InputError(f"{src}: volume contains NaN or infinite values; replace them before detection")
    lo, hi = float(hu.min()), float(hu.max())
    if lo == hi:
        raise InputError(f"{src}: every voxel has the value {lo:g}; the volume is empty")
    if lo < HU_FLOOR:
        lo = _padding_as_air(volume, lo)
    problem = None
    if lo < HU_FLOOR or hi > HU_CEILING:
        problem = f"values {lo:g}..{hi:g} lie outside any Hounsfield-unit range"
    elif lo > AIR_EXPECTED_BELOW_HU:
        problem = f"no voxel is below {AIR_EXPECTED_BELOW_HU:g} (lowest {lo:g}), so there is no air: not CT in HU"
    if problem:
        if not allow_non_hu:
            raise InputError(f"{src}: {problem}; give CT in Hounsfield units, or pass --allow-non-hu to go on anyway")
        volume.warnings.append(problem)
        log.warning("%s: %s; going on because --allow-non-hu was given", src, problem)
