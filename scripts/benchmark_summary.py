"""The batch's own bookkeeping: how long one rewrite of summary.csv and report.html takes, by the number of cases it
lists, and how long an input's content hash takes.

    python scripts/benchmark_summary.py [--cases 1000 10000 100000] [--runs 3] [--hash FILE ...]
                                        [--series DICOM_FOLDER ...]

Rows like those of a real batch (every column filled), written into a temporary folder; medians of the runs, and the
sizes of both files. batch.SummaryWriter paces its rewrites by this cost. With --hash, each file's content hash
(bundle.content_hash, as the batch computes it), timed over the runs after one read that warms the page cache. With
--series, listing each DICOM folder's CT series as `batch --each-series` does (batch.each_ct_series), timed the same
way.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from medanomaly.batch import each_ct_series, write_summary
from medanomaly.bundle import content_hash

ROW = {"input": "/data/site/case.nii.gz", "status": "ok", "error": "", "seconds": 3.2, "volume_score": 0.93,
       "findings": 2, "top_finding_probability": 0.9999, "top_finding_p_value": 0.07,
       "top_finding_ras_mm": "1.0 2.0 3.0", "top_finding_volume_mm3": 95.0,
       "top_finding_flagged_by": "chest-ct-tube-outlier", "slices_unlike_reference": 1,
       "body_outside_field_of_view_pct": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hash", nargs="*", default=[], metavar="FILE")
    ap.add_argument("--series", nargs="*", default=[], metavar="DICOM_FOLDER")
    args = ap.parse_args()
    for label, function, paths in (("content hash", content_hash, args.hash),
                                   ("CT series listed", each_ct_series, args.series)):
        for path in paths:
            function(path)
            seconds = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                function(path)
                seconds.append(time.perf_counter() - t0)
            print(f"{label} of {path}: {statistics.median(seconds):.3f} s (median of {args.runs}, page cache warm)")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        for n in args.cases:
            rows = [dict(ROW, case=f"case{i}", volume_p_value=1.0 / (i + 1)) for i in range(n)]
            seconds = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                write_summary(rows, out, "a model", overview=True)
                seconds.append(time.perf_counter() - t0)
            sizes = {name: (out / name).stat().st_size // 1024 for name in ("report.html", "summary.csv")}
            print(f"{n} cases: {statistics.median(seconds):.3f} s per rewrite (median of {args.runs}; runs "
                  f"{', '.join(f'{s:.3f}' for s in seconds)}), report.html {sizes['report.html']} kB, "
                  f"summary.csv {sizes['summary.csv']} kB")


if __name__ == "__main__":
    main()
