"""Multi-frame (enhanced) DICOM CT against the single-frame series it was made from: read, compared and timed.

    python scripts/benchmark_dicom_multiframe.py [--runs 5] [--json F]

Two series, each converted to one Legacy Converted Enhanced CT Image file by highdicom (the conversion a PACS or a
scanner's export makes):
- the shared abdomen series (Siemens, JPEG 2000), in a copy with its blanked UIDs filled in (benchmark_dicom_seg's
  with_uids), its frames as the converter stores them;
- the whole chest_ct_01 (512x512x141) written as a series (Testing/conftest.write_dicom_series), converted with the
  rescale intercept varying frame by frame and the frames stored in a shuffled order.
For each: the voxels and geometry read from the file against those read from the series (read_volume both), and the
time of read_volume for each (medians of the runs, page cache warm), and the peak RSS of a fresh process that reads
each once. The CTs are those of ../shared/data (see ../shared/data/SOURCES.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_dicom_seg import SHARED_SERIES, with_uids  # noqa: E402
from conftest import grid_comparison, legacy_enhanced_ct, write_dicom_series, write_enhanced_ct  # noqa: E402

from medanomaly.volumes import read_volume  # noqa: E402

SHARED_CHEST = ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz"


def convert(series: Path, path: Path) -> Path:
    """The series' files as one Legacy Converted Enhanced CT Image, frames in the converter's order."""
    datasets = [pydicom.dcmread(p) for p in sorted(series.iterdir()) if p.is_file()]
    for ds in datasets:
        ds.decompress()  # the converter joins the frames' pixel data as they are
    return legacy_enhanced_ct(datasets, path)


# VmHWM, the peak RSS of the process's own memory since its exec (ru_maxrss would carry over this large parent's)
PEAK_RSS_CHILD = """
import sys
from medanomaly.volumes import read_volume
def peak_mb():
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
before = peak_mb()
read_volume(sys.argv[1])
print(before, peak_mb())
"""


def peak_rss_mb(path) -> dict:
    """Peak RSS of a fresh process that reads the input once, and the same process's peak after its imports."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(path)], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return {"after_imports_mb": int(out[0]), "after_read_mb": int(out[1])}


def timed(path, runs: int) -> tuple[float, sitk.Image]:
    times, image = [], None
    for _ in range(runs):
        start = time.perf_counter()
        image = read_volume(path).image
        times.append(time.perf_counter() - start)
    return statistics.median(times), image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {"runs": args.runs, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        series = tmp / "abdomen"
        with_uids(SHARED_SERIES, series)
        chest_series = tmp / "chest"
        chest = sitk.ReadImage(str(SHARED_CHEST))
        write_dicom_series(chest, chest_series)
        order = [int(k) for k in np.random.default_rng(2026).permutation(chest.GetDepth())]
        cases = {
            "abdomen_ct_02 (Siemens, JPEG 2000), converter's frame order": (
                series, convert(series, tmp / "abdomen_enhanced" / "ct.dcm")),
            "chest_ct_01 512x512x141, intercepts -1024/-1100/-2048 by frame, frames shuffled": (
                chest_series, write_enhanced_ct(chest, tmp / "chest_enhanced" / "ct.dcm",
                                                intercepts=(-1024.0, -1100.0, -2048.0), frame_order=order)),
        }
        for name, (folder, enhanced) in cases.items():
            series_seconds, series_image = timed(folder, args.runs)
            enhanced_seconds, enhanced_image = timed(enhanced, args.runs)
            report["cases"][name] = {
                **grid_comparison(enhanced_image, series_image),
                "enhanced_file_mb": round(enhanced.stat().st_size / 2**20, 1),
                "read_series_s_median": round(series_seconds, 3),
                "read_enhanced_s_median": round(enhanced_seconds, 3),
                "peak_rss_series": peak_rss_mb(folder),
                "peak_rss_enhanced": peak_rss_mb(enhanced),
            }
            print(name, json.dumps(report["cases"][name]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
