"""Where 2 batch workers' time goes on this machine: CPU-seconds per process, and how the two cores share work.

    python scripts/benchmark_batch_cpu.py [--volumes 20] [--model M]

1. Core probe: three kinds of work on one torch thread (a Python loop, a 512x512 matrix product, passes over 64 MB of
   memory), each alone and then as two processes at once; compute-bound work should not slow when both cores are
   busy, memory-bound work shows the shared cache and memory bandwidth.
2. Batch watch: `medanomaly batch` of demo-sized volumes with 1 worker x 1 thread and 2 workers x 1 thread, while the
   command's process tree is sampled every 0.5 s with psutil: wall time and the CPU-seconds each process used (the
   command's own, each worker's). CPU-seconds per case that rise with 2 workers are contention; wall time a worker
   does not spend on the CPU is start-up, shut-down and waiting.

The volumes are 40-slice windows of Testing/Data/chest_ct_demo.nii.gz (derived from chest_ct_01; see
Testing/Data/README.md for its provenance).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from benchmark_batch import ENV, batch_command, write_demo_volumes
PROBE = """
import sys, time, torch
torch.set_num_threads(1)
kind = sys.argv[1]
t = time.perf_counter()
if kind == "python loop":
    s = 0
    for i in range(30_000_000):
        s += i * i
elif kind == "matrix product":
    a = torch.randn(512, 512)
    for _ in range(400):
        a @ a
else:
    a = torch.randn(16_000_000)
    for _ in range(60):
        a.mul_(1.0000001)
print(round(time.perf_counter() - t, 3))
"""


def at_once(code: str, args: list[str], copies: int) -> list[float]:
    """Start `copies` processes of `python -c code *args` at once; the number each prints last."""
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def probe(kind: str, copies: int) -> list[float]:
    return at_once(PROBE, [kind], copies)


def watch(cmd: list[str]) -> tuple[float, dict[int, tuple[str, float]]]:
    """Run `cmd`, sampling its process tree; returns the wall time and each process's last seen CPU-seconds."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, seen = psutil.Process(p.pid), {}
    while p.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for q in procs:
            try:
                cpu = q.cpu_times()
                seen[q.pid] = ("command" if q.pid == p.pid else " ".join(q.cmdline())[-40:], cpu.user + cpu.system)
            except psutil.Error:
                pass
        time.sleep(0.5)
    return time.perf_counter() - t0, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--model", default="chest-ct-vqvae-fs-256")
    args = ap.parse_args()
    for kind in ("python loop", "matrix product", "memory passes"):
        alone, both = probe(kind, 1), probe(kind, 2)
        print(f"core probe, {kind}: alone {alone[0]:.2f} s, two at once {both[0]:.2f} and {both[1]:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        write_demo_volumes(inputs, args.volumes)
        for workers in (1, 2):
            wall, seen = watch(batch_command(inputs, Path(tmp) / f"out{workers}", workers, args.model,
                                             extra=("--threads-per-worker", "1")))
            command = sum(cpu for name, cpu in seen.values() if name == "command")
            worker_cpu = sorted((cpu for name, cpu in seen.values() if name != "command" and cpu > 1.0), reverse=True)
            print(f"{workers} worker(s) x 1 thread, {args.volumes} volumes: wall {wall:.1f} s; command process "
                  f"{command:.1f} CPU-s; worker processes {', '.join(f'{c:.1f}' for c in worker_cpu)} CPU-s "
                  f"(total {sum(worker_cpu):.1f}, {sum(worker_cpu) / args.volumes:.2f} per case)")


if __name__ == "__main__":
    main()
