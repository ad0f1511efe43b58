"""Benchmark `medanomaly batch`: throughput with 1 and 2 local workers on 20 demo-sized volumes, peak RSS per
worker against its bound, resumption after kill -9, and how the summary ranks the lab's anomalous cases above its
normal ones.

    python scripts/benchmark_batch.py [--volumes 20] [--lab-cases runs/lab-cases] [--model M] [--ranking-only]
"""

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from medanomaly.batch import ranking_key
from medanomaly.bundle import resolve_model
from medanomaly.metrics import roc_auc

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "Testing" / "Data" / "chest_ct_demo.nii.gz"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))


def write_demo_volumes(folder: Path, count: int) -> None:
    """`count` demo-sized volumes in `folder`: 40-slice windows of the demo CT (256x256x40)."""
    image = sitk.ReadImage(str(DEMO))
    for i in range(count):
        sitk.WriteImage(image[:, :, i % 20: i % 20 + 40], str(folder / f"case{i:02d}.nii.gz"))


def batch_command(inputs, out, workers, model, memory_limit="2GB", extra=()) -> list[str]:
    return [sys.executable, "-m", "medanomaly.cli", "-q", "batch", str(inputs), "-o", str(out), "--workers",
            str(workers), "--memory-limit", memory_limit, "--no-overview", "--model", model, *extra]


def run_batch(inputs, out, workers, model, memory_limit="2GB", extra=()):
    t0 = time.perf_counter()
    subprocess.run(batch_command(inputs, out, workers, model, memory_limit, extra), env=ENV, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def summary(out):
    with open(Path(out) / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def rank_lab_cases(lab: Path, tmp: Path, model: str) -> None:
    """Batch the lab's cases with `model` and the reconstruction baseline (2 workers, the cards' calibration, as a
    user's batch) and print how each summary ranks the anomalous cases above the normal ones."""
    lab = lab.resolve()  # the listing lives in a temporary folder
    if not (lab / "cases.json").exists():
        print(f"no lab cases in {lab}; build them with scripts/benchmark_lab.py")
        return
    manifest = json.loads((lab / "cases.json").read_text())
    listing = tmp / "lab.csv"
    listing.write_text("path\n" + "\n".join(str(lab / c["volume"]) for c in manifest["cases"]) + "\n")
    normal = {c["volume"].split(".")[0]: c["normal"] for c in manifest["cases"]}
    for ranking_model in (model, "chest-ct-vqvae-recon"):
        out = tmp / f"lab-{ranking_model}"
        run_batch(listing, out, 2, ranking_model)
        rows = [r for r in summary(out) if r["status"] == "ok"]
        auroc = roc_auc([-ranking_key(r)[1] for r in rows], [not normal[r["case"]] for r in rows])
        print(f"summary ranking of the lab's {len(rows)} cases by {ranking_model}: volume AUROC {auroc:.3f} "
              f"(anomalous vs normal slabs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lab-cases", default=str(ROOT / "runs" / "lab-cases"))
    ap.add_argument("--skip-lab", action="store_true")
    ap.add_argument("--model", default=None, help="the model every batch runs (default: the catalog's default)")
    ap.add_argument("--ranking-only", action="store_true", help="only the summary's ranking of the lab's cases")
    args = ap.parse_args()
    model = args.model or resolve_model(None).name
    print(f"model: {model}")
    if args.ranking_only:
        with tempfile.TemporaryDirectory() as tmp:
            rank_lab_cases(Path(args.lab_cases), Path(tmp), model)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = tmp / "in"
        inputs.mkdir()
        write_demo_volumes(inputs, args.volumes)
        # (workers, torch threads per worker): the default shares the cores (1 worker x all cores, 2 workers x 1
        # core each on this 2-core machine); 1 worker x 1 thread is the same-sized worker, for scaling per worker
        cores = os.cpu_count() or 1
        two_workers = (2, max(1, cores // 2))
        configs = [(1, cores), (1, 1), two_workers]
        times = {c: [] for c in configs}
        busy = {c: [] for c in configs}
        for run in range(args.runs):
            for workers, threads in configs:
                out = tmp / f"out{workers}x{threads}_{run}"
                times[(workers, threads)].append(
                    run_batch(inputs, out, workers, model, extra=("--threads-per-worker", str(threads))))
                rows = summary(out)
                assert len(rows) == args.volumes and all(r["status"] == "ok" for r in rows)
                busy[(workers, threads)].append(sum(float(r["seconds"]) for r in rows))
        median = {c: statistics.median(t) for c, t in times.items()}
        for (workers, threads), t in median.items():
            per_worker_busy = statistics.median(busy[(workers, threads)]) / workers
            print(f"{args.volumes} volumes (256x256x40), {workers} worker(s) x {threads} thread(s): {t:.1f} s "
                  f"({args.volumes / t:.2f} vol/s); cases busy {per_worker_busy:.1f} s per worker, the rest "
                  f"({t - per_worker_busy:.1f} s) is the command, the scheduler, and starting and closing the worker processes; "
                  f"each worker's torch import counts in the rest, its MONAI import and model load in its first case "
                  f"(medians of {args.runs}; "
                  f"runs: {', '.join(f'{s:.1f}' for s in times[(workers, threads)])} s)")
        two = median[two_workers]
        per_run = [t1 / t2 for t1, t2 in zip(times[(1, 1)], times[two_workers])]
        print(f"speed-up per run (1 x 1 over 2 x {two_workers[1]} of the same run): "
              f"{', '.join(f'{r:.2f}x' for r in per_run)}")
        print(f"speed-up of 2 workers over 1 worker using all {cores} cores (the default): {median[(1, cores)] / two:.2f}x")
        print(f"speed-up of 2 workers over 1 worker of the same size (1 thread each): {median[(1, 1)] / two:.2f}x")

        # kill -9 midway, then re-run: count what was kept and what was recomputed
        out = tmp / "killed"
        cmd = [sys.executable, "-m", "medanomaly.cli", "-q", "batch", str(inputs), "-o", str(out), "--workers", "2",
               "--no-overview"]
        process = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while not ((out / "summary.csv").exists() and len(summary(out)) >= args.volumes // 2):
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        done_before = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
        run_batch(inputs, out, 2, model)
        rows = summary(out)
        skipped = {r["case"] for r in rows if r["status"] == "skipped"}
        recomputed = {r["case"] for r in rows if r["status"] == "ok"}
        print(f"kill -9 after {len(done_before)} completed case(s): re-run skipped {len(skipped)}, recomputed "
              f"{len(recomputed)}; completed cases lost: {len(done_before - skipped)}, recomputed twice: "
              f"{len(done_before & recomputed)}")

        # peak RSS per worker against its bound: each case records its worker's peak RSS in findings.json
        peaks = [json.loads((out / r["case"] / "findings.json").read_text())["peak_rss_mb"] for r in rows
                 if r["status"] in ("ok", "skipped")]
        print(f"peak RSS per worker: max {max(peaks):.0f} MB, median {statistics.median(peaks):.0f} MB "
              f"(bound 2048 MB per worker)")

        if not args.skip_lab:
            rank_lab_cases(Path(args.lab_cases), tmp, model)


if __name__ == "__main__":
    main()
