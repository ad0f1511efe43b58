"""Benchmark `detect` on the shared CTs: seconds per volume, slices per second and peak RSS, split into pipeline
(everything but the network) and network time. Each run is a fresh child process so that peak RSS is per volume.

    python scripts/benchmark_pipeline.py [--runs 5] [--model NAME] [--inputs ...]

Prints medians over the runs (this machine is noisy) and writes the raw numbers as JSON with --json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
DEFAULT_INPUTS = [SHARED_CT / "chest_ct_01.nii.gz", SHARED_CT / "abdomen_ct_01.nii.gz",
                  SHARED_CT / "abdomen_ct_02_dicom", ROOT / "Testing" / "Data" / "chest_ct_demo.nii.gz"]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import medanomaly
from medanomaly.api import peak_rss_mb
t_import = time.perf_counter() - t0
(r,) = medanomaly.detect(sys.argv[1], sys.argv[2], model=sys.argv[3] or None, device=sys.argv[4])
t = r.timings
print(json.dumps({"slices": r.volume.image.GetSize()[2], "size": list(r.volume.image.GetSize()),
                  "network": t["network"], "pipeline": t["pipeline"], "write": t["write"],
                  "read_to_written": t["total"], "import": t_import, "peak_rss_mb": peak_rss_mb(),
                  "findings": len(r.findings), "volume_score": r.volume_score}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--inputs", nargs="*", default=[str(p) for p in DEFAULT_INPUTS])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows, raw = [], {}
    for path in args.inputs:
        if not Path(path).exists():
            print(f"skipping {path}: not found", file=sys.stderr)
            continue
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as out:
                proc = subprocess.run([sys.executable, "-c", CHILD, path, out, args.model, args.device],
                                      capture_output=True, text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        raw[path] = runs
        med = {k: statistics.median(r[k] for r in runs) for k in ("network", "pipeline", "write", "read_to_written",
                                                                 "peak_rss_mb")}
        pipeline_with_write = statistics.median(r["pipeline"] + r["write"] for r in runs)
        slices = runs[0]["slices"]
        rows.append((Path(path).name, "x".join(map(str, runs[0]["size"])), med["read_to_written"],
                     slices / med["read_to_written"], med["pipeline"], pipeline_with_write, med["network"],
                     med["peak_rss_mb"], runs[0]["findings"]))
    header = ("volume", "size", "s/volume", "slices/s", "pipeline s", "pipeline+write s", "network s",
              "peak RSS MB", "findings")
    print(f"medians of {args.runs} runs, device {args.device}, each run a fresh process "
          "(s/volume = read + pipeline + network + writing all files)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.0f} | {r[8]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
