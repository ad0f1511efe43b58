"""A DICOM SEG and SR of a real scanner's series: written, read back and timed.

    python scripts/benchmark_dicom_seg.py [--series DIR] [--model NAME] [--sensitivity 0.9] [--runs 5] [--json F]

The shared abdomen series (Siemens, JPEG 2000, de-identified) is used twice: as it is, where `detect` must warn that
it cannot carry a SEG (its Study and Series Instance UIDs were blanked), and as a copy in a temporary folder with new
UIDs filled in where they are empty, as a PACS export would have them (every other byte as read, pixel data still
compressed). For the copy: the findings, the SEG's size and frames, a check that the SEG read back with highdicom
gives labels.nrrd slice by slice through the source instances, and the time of writing it (medians of the runs); the
SR's size, its measurement groups (one per finding, tracking its segment) and the time of writing it.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

import medanomaly
from medanomaly.outputs import DICOM_SEG_FILE, DICOM_SR_FILE, write_dicom_report, write_dicom_segmentation
from medanomaly.volumes import read_volume

SHARED_SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "abdomen_ct_02_dicom"


def with_uids(series: Path, out: Path) -> None:
    """A copy of the series with the empty instance, series and study UIDs filled in (the same for every file of
    the series, derived from its frame of reference)."""
    out.mkdir(parents=True)
    for path in sorted(p for p in series.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        base = str(ds.get("FrameOfReferenceUID", "medanomaly"))
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid(entropy_srcs=[base, "study"])
        ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid(entropy_srcs=[base, "series"])
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(out / path.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--series", type=Path, default=SHARED_SERIES)
    ap.add_argument("--model", default=None, help="model name (default: the default model)")
    ap.add_argument("--sensitivity", type=float, default=0.9)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {"series": str(args.series), "model": args.model, "sensitivity": args.sensitivity, "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (as_is,) = medanomaly.detect(args.series, tmp / "as-is", model=args.model, sensitivity=args.sensitivity)
        report["as_is"] = {"findings": len(as_is.findings), "seg_written": (as_is.output_dir / DICOM_SEG_FILE).exists(),
                           "warnings": [w for w in as_is.warnings if "DICOM SEG" in w]}
        copy = tmp / "series"
        with_uids(args.series, copy)
        (result,) = medanomaly.detect(copy, tmp / "out", model=args.model, sensitivity=args.sensitivity)
        seg_path = result.output_dir / DICOM_SEG_FILE
        volume = read_volume(copy)
        seconds, sr_seconds = [], []
        for run in range(args.runs):
            t0 = time.perf_counter()
            segmentation, sources = write_dicom_segmentation(
                result.labels, result.findings, volume.image, volume.dicom_files, tmp / f"run{run}.dcm",
                model_name=result.model["name"], software_version=medanomaly.__version__)
            t1 = time.perf_counter()
            write_dicom_report(segmentation, sources, result.findings, tmp / f"run{run}.sr.dcm",
                               model_name=result.model["name"], software_version=medanomaly.__version__)
            seconds.append(t1 - t0)
            sr_seconds.append(time.perf_counter() - t1)
        import highdicom as hd

        seg = hd.seg.segread(seg_path)
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.dicom_files]
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                   skip_overlap_checks=True)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output_dir / "labels.nrrd")))
        report["with_uids"] = {
            "size": list(volume.image.GetSize()), "findings": len(result.findings),
            "seg_written": seg_path.exists(), "segments": int(seg.number_of_segments),
            "frames": int(seg.NumberOfFrames), "seg_bytes": seg_path.stat().st_size,
            "labels_equal_by_source_instance": bool(pixels.shape == labels.shape and np.array_equal(pixels, labels)),
            "write_seconds_median": round(statistics.median(seconds), 3),
            "write_seconds": [round(s, 3) for s in seconds],
            "warnings": [w for w in result.warnings if "DICOM SEG" in w],
        }
        sr_path = result.output_dir / DICOM_SR_FILE
        sr = hd.sr.srread(sr_path)
        groups = sr.content.get_volumetric_roi_measurement_groups()
        report["with_uids"]["sr"] = {
            "written": sr_path.exists(), "bytes": sr_path.stat().st_size, "measurement_groups": len(groups),
            "groups_track_their_segments": ([g.tracking_uid for g in groups]
                                            == [s.TrackingUID for s in seg.SegmentSequence]),
            "write_seconds_median": round(statistics.median(sr_seconds), 3),
            "write_seconds": [round(s, 3) for s in sr_seconds],
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
