"""`medanomaly batch`: rank a whole repository of CT scans by how unusual they are, resumably, on local worker
processes or an existing Dask distributed cluster.

- Inputs: a folder (searched recursively for volumes and DICOM series), a glob, or a CSV manifest (column `path`).
- Each case is written by `detect` (atomically, OUT/<case>/); `summary.csv` ranks cases by volume score, and
  `report.html` shows the same ranking with each case's overview image.
- A case is skipped when its findings.json records the same input content hash, model hash and settings hash: a
  re-run after a crash (even kill -9) recomputes only what was not finished, and never a completed case. Workers hash
  the inputs they run; the batch's own process hashes only those an earlier run completed.
- Workers are Dask distributed processes with a memory limit each; `--scheduler ADDRESS` uses a running cluster.
"""

from __future__ import annotations

import csv
import functools
import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __version__
from .bundle import content_hash, default_model_name
from .ensemble import model_folders, model_identity, resolved_spec
from .errors import InputError
from .report import is_failed, write_report
from .volumes import (VOLUME_SUFFIXES, case_name_for, dicom_series, is_dicom_folder, series_input,
                      split_series_input)

log = logging.getLogger(__name__)
SUMMARY_FIELDS = ["rank", "case", "input", "series_uid", "volume_score", "volume_p_value", "findings",
                  "top_finding_probability", "top_finding_p_value", "top_finding_ras_mm", "top_finding_volume_mm3",
                  "top_finding_flagged_by", "slices_unlike_reference", "body_outside_field_of_view_pct", "status",
                  "error", "seconds"]


def each_ct_series(folder: str) -> list[str]:
    """A DICOM folder as inputs: one per CT series where it holds several (series_input), else the folder itself
    (which read_volume refuses with the reason where it holds no CT)."""
    uids = sorted(s.uid for s in dicom_series(Path(folder)) if s.is_ct)
    return [series_input(folder, uid) for uid in uids] if len(uids) > 1 else [folder]


def find_inputs(inputs: list[str], each_series: bool = False) -> list[str]:
    """Expand folders (recursively: volume files and DICOM series folders), globs and CSV manifests (columns `path`
    and, optionally, `series`). With `each_series`, every CT series of a DICOM folder is an input of its own; the
    folders are read (their headers) four at a time."""
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() == ".csv":
            try:  # UTF-8 whatever the locale (utf-8-sig: a spreadsheet's byte-order mark is not part of the header)
                with open(path, newline="", encoding="utf-8-sig") as f:
                    rows = list(csv.DictReader(f))
            except UnicodeDecodeError:
                raise InputError(f"{path}: the manifest is not UTF-8 text; save it as CSV in UTF-8") from None
            if not rows or "path" not in rows[0]:
                raise InputError(f"{path}: a manifest needs a 'path' column")
            for r in rows:
                row_path = str((path.parent / r["path"]).resolve()) if not os.path.isabs(r["path"]) else r["path"]
                found.append(series_input(row_path, r["series"].strip()) if (r.get("series") or "").strip()
                             else row_path)
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                folder = Path(root)
                if is_dicom_folder(folder):
                    found.append(str(folder))
                    continue
                found += [str(folder / f) for f in sorted(files) if f.lower().endswith(VOLUME_SUFFIXES)]
        elif any(ch in item for ch in "*?["):
            found += sorted(glob.glob(item, recursive=True))
        elif path.exists():
            found.append(str(path))
        else:
            raise InputError(f"{item}: no such file, folder or glob match; check the path")
    if each_series:
        folders = [p for p in found if os.path.isdir(p)]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            expanded = dict(zip(folders, pool.map(each_ct_series, folders)))
        found = [item for p in found for item in expanded.get(p, [p])]
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InputError("no CT volumes found in the inputs; give folders, globs or a CSV manifest")
    return unique


def unique_case_names(paths: list[str]) -> dict[str, str]:
    """Case folder names: the file or folder name, with a short path hash where two inputs share one."""
    names: dict[str, str] = {}
    counts: dict[str, int] = {}
    for p in paths:
        counts[case_name_for(p)] = counts.get(case_name_for(p), 0) + 1
    for p in paths:
        name = case_name_for(p)
        names[p] = name if counts[name] == 1 else f"{name}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
    return names


def input_bytes(path: str) -> int:
    """A case's size on disk: the file, or every file of a DICOM folder (of all its series)."""
    path = split_series_input(path)[0]
    if os.path.isdir(path):
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return os.path.getsize(path)


# the options that change what a case's files hold (device and threads do not): with the software version, a re-run
# with any of them changed recomputes its cases instead of skipping them
OUTPUT_SETTINGS = ("sensitivity", "fp_rate", "min_size_mm3", "allow_non_hu", "mood", "overview")


def settings_identity(options: dict) -> str:
    """SHA-256 over the software version and the options in OUTPUT_SETTINGS."""
    defaults = {"allow_non_hu": False, "mood": False, "overview": True}  # as run_case and detect take them
    settings = {"medanomaly": __version__, **{k: options.get(k, defaults.get(k)) for k in OUTPUT_SETTINGS}}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def earlier_run(case_dir: Path, model_id: str, settings_id: str) -> dict | None:
    """The case's findings.json when a batch wrote it with this model, software version and settings: only such a
    case can be skipped, once its input's content hash matches the one it records too."""
    file = case_dir / "findings.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError:
        return None
    batch = summary.get("batch", {})
    if (batch.get("model_hash"), batch.get("settings_hash")) == (model_id, settings_id) and batch.get("input_sha256"):
        return summary
    return None


def unreadable(path: str, exc: OSError) -> str:
    return f"cannot read {path}: {exc.strerror or exc}; check the path"


def hash_or_error(path: str) -> tuple[str | None, str | None]:
    """The input's content hash (for one series of a folder, the whole folder's: a change to any of its series runs
    them all again), or why it cannot be read."""
    try:
        return content_hash(split_series_input(path)[0]), None
    except OSError as exc:
        return None, unreadable(path, exc)


# inputs read at once in the batch's own process (file reads and hashlib release the GIL): the content hashes of the
# cases that an earlier run completed with this model and settings, which a matching hash lets it skip, and the DICOM
# folders' headers for --each-series
HASH_THREADS = 4


@functools.lru_cache(maxsize=2)
def worker_scorer(model: str | None, freeze: bool = False):
    """The model, loaded (and its checksums verified) once per worker process rather than once per case.

    `freeze`, for the batch's own local workers: torch, MONAI and the model stay for the worker's whole life, so
    everything loaded so far is frozen out of Python's garbage collections, during the cases and at exit, where the
    last collections over those objects took about 1 s of each worker's 1.1 s exit. Not on a cluster the batch did
    not start, whose workers may hold other work's objects.
    """
    from .ensemble import load_scorer

    scorer = load_scorer(model)
    if freeze:
        gc.freeze()
    return scorer


def run_case(path: str, case: str, output: str, model: str | None, options: dict, model_id: str,
             settings_id: str) -> dict:
    """One case in a worker: hash its input, detect, record the hashes in findings.json, return the summary row.
    The worker hashes the input, not the batch's own process, so a first run over many scans starts at once and
    reads each scan on as many workers as there are."""
    from .api import detect_volume, write_case
    from .errors import MedAnomalyError
    from .volumes import read_volume

    if options.get("threads"):  # share the cores between the workers instead of oversubscribing them
        import torch

        torch.set_num_threads(int(options["threads"]))
    t0 = time.perf_counter()
    row = {"case": case, "input": path, "status": "ok", "error": ""}
    input_hash, error = hash_or_error(path)
    if error is not None:
        return dict(row, status="failed", error=error, seconds=round(time.perf_counter() - t0, 2))
    try:
        volume = read_volume(path, allow_non_hu=options.get("allow_non_hu", False))
        volume.case_name = case
        scorer = worker_scorer(model, options.get("own_workers", False))
        result = detect_volume(volume, scorer, device=options.get("device", "cpu"),
                               sensitivity=options.get("sensitivity"), fp_rate=options.get("fp_rate"),
                               min_size_mm3=options.get("min_size_mm3"))
        result.extra["batch"] = {"input_sha256": input_hash, "model_hash": model_id, "settings_hash": settings_id}
        write_case(result, output, mood=options.get("mood", False), overview=options.get("overview", True))
        row.update(_summary_row(result.summary()))
    except MedAnomalyError as exc:
        row.update(status="failed", error=str(exc))
    except Exception as exc:  # one case's failure never stops the batch
        row.update(status="failed", error=f"unexpected {type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _summary_row(summary: dict) -> dict:
    top = summary["findings"][0] if summary["findings"] else None
    return {"series_uid": summary.get("series_uid") or "",  # the DICOM series examined; empty for a volume file
            "volume_score": summary["volume_score"], "volume_p_value": summary.get("volume_p_value", ""),
            "findings": len(summary["findings"]),
            "top_finding_probability": top["max_probability"] if top else "",
            # the chance that a normal volume of this length has a finding as strong (findings.find_findings)
            "top_finding_p_value": top.get("p_value", "") if top else "",
            "top_finding_ras_mm": " ".join(f"{v:.1f}" for v in top["centroid_ras_mm"]) if top else "",
            "top_finding_volume_mm3": top["volume_mm3"] if top else "",
            # the model or ensemble member that flagged it (find_findings); empty before software 0.6.0
            "top_finding_flagged_by": top.get("flagged_by", "") if top else "",
            # slices that look unlike the model's normal reference (api.check_reference); empty where not checked
            "slices_unlike_reference": (summary["reference_check"]["slices_unlike"]
                                        if summary.get("reference_check", {}).get("available") else ""),
            # the share of the body that the model's field of view left out (api.check_coverage); empty before 0.3.0
            "body_outside_field_of_view_pct": (round(summary["coverage"]["body_share_outside"] * 100, 2)
                                               if summary.get("coverage") else "")}


def ranking_key(row: dict) -> tuple:
    """Failed cases last; the others by volume p-value, smallest (most unusual) first. The p-value is 1 - volume score
    without rounding, so it keeps ordering volumes whose scores all read 1.0; a case written by a version without
    it ranks by its volume score."""
    failed = is_failed(row)
    for field, transform in (("volume_p_value", float), ("volume_score", lambda v: 1.0 - float(v))):
        if row.get(field) not in ("", None):
            return failed, transform(row[field])
    return failed, 2.0


def write_summary(rows: list[dict], output: Path, model: str | None = None, overview: bool = True) -> Path:
    """summary.csv, ranked by volume p-value (failed cases last), and the same ranking as report.html (with each
    case's overview image where the batch writes them), both written atomically."""
    ranked = [dict(row, rank=rank) for rank, row in enumerate(sorted(rows, key=ranking_key), start=1)]
    tmp = output / f".summary.csv.tmp{os.getpid()}"
    # case names and errors may hold any character, and names the locale could not decode their original bytes
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)
    os.replace(tmp, output / "summary.csv")
    write_report(ranked, output, model, overview)
    return output / "summary.csv"


class SummaryWriter:
    """Keeps summary.csv and report.html current as cases finish. A rewrite costs time in proportion to the cases it
    lists (1.6 s for 100,000 on this project's 2-core machine), so after every case it would cost a batch of many
    thousands more than its cases do. The files are rewritten after a case only once REWRITE_GAP times the last
    rewrite's time has passed since it: after every case while the listing is short, every few seconds when it is
    long, and at most about 1/REWRITE_GAP of the batch's time. The last rewrite, when the batch ends, always runs."""

    REWRITE_GAP = 10.0

    def __init__(self, output: Path, model: str | None, overview: bool, clock=time.monotonic):
        self.output, self.model, self.overview, self.clock = output, model, overview, clock
        self.last_start, self.last_cost = None, 0.0

    def update(self, rows: list[dict], final: bool = False) -> bool:
        """Rewrite both files if it is time (or `final`); True when they were rewritten."""
        start = self.clock()
        if not final and self.last_start is not None and start - self.last_start < self.REWRITE_GAP * self.last_cost:
            return False
        write_summary(rows, self.output, self.model, self.overview)
        self.last_start, self.last_cost = start, self.clock() - start
        return True


# What the local cluster changes from Dask's defaults. Dask's housekeeping costs CPU that a case needs once the
# workers fill every core: each worker samples its stacks every 10 ms for the dashboard's profiler (there is no
# dashboard here), and every event loop (scheduler, nannies, workers) checks its own health every 20 ms. Idle, a
# 2-worker cluster with the defaults used 2.6 s of CPU in 20 s (parent 1.1 s, workers 0.75 s each), 13% of a core;
# with these, 0.7 s. Memory is still watched every 100 ms, so the bound on each worker is enforced as before.
LOCAL_CLUSTER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,  # see local_cluster
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
}


def local_cluster(workers: int, memory_limit: str):
    """Local worker processes on loopback, each bounded by `memory_limit` (its nanny restarts it beyond).

    Dask spawns workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap threshold at 128 KiB: every
    tensor becomes a fresh mmap, page-faulted and zeroed on each use, and a case runs about 40% slower (6.1 s
    against 4.3 s per 256x256x40 volume in scripts/benchmark_batch.py). These workers are spawned without it.
    """
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set(LOCAL_CLUSTER_CONFIG):
        # no dashboard; the scheduler's small HTTP server (health, metrics) takes a free loopback port, where
        # Dask's default would claim 8787 and warn whenever another cluster on the machine has it
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                            host="127.0.0.1", dashboard_address=None,
                            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})


def _malloc_trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")  # runs in the worker (os.environ.get itself would carry ours)


def workers_with_dask_malloc_trim(client) -> list[str]:
    """The addresses of the cluster's workers that run with MALLOC_TRIM_THRESHOLD_ set (see `local_cluster`)."""
    found = client.run(_malloc_trim_threshold)
    return sorted(address for address, value in found.items() if value is not None)


def _missing_folders(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.isdir(p)]  # runs in the worker: what its filesystem lacks


def workers_missing(client, folders: list[str]) -> dict[str, list[str]]:
    """For each worker that cannot see some of `folders` (a cluster without the shared filesystem the batch assumes),
    the folders it lacks."""
    return {address: missing for address, missing in client.run(_missing_folders, folders).items() if missing}


def check_cluster(client, model_folders: list[str]) -> None:
    """Before anything runs on an existing cluster: refuse workers that cannot see the model folders (the batch
    gives them the paths this process resolved) and warn about workers with Dask's malloc setting."""
    blind = workers_missing(client, model_folders)
    if blind:
        raise InputError(f"{len(blind)} of the cluster's {len(client.scheduler_info()['workers'])} workers cannot "
                         f"see the model folder {next(iter(blind.values()))[0]}; put the models and inputs on a "
                         "filesystem every worker shares, at the same paths")
    slow = workers_with_dask_malloc_trim(client)
    if slow:
        log.warning("%d of the cluster's workers run with MALLOC_TRIM_THRESHOLD_ set (Dask's default), which makes "
                    "each case about 40%% slower; start workers with DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="
                    "'{\"MALLOC_TRIM_THRESHOLD_\": None}' (see the README)", len(slow))


def batch(inputs: list[str], output: str | Path, *, model: str | None = None, workers: int = 2,
          memory_limit: str = "3GB", scheduler: str | None = None, progress=None, each_series: bool = False,
          **options) -> list[dict]:
    """Run `detect` over many inputs on a Dask cluster (local processes by default); returns the summary rows.
    `each_series`: every CT series of a DICOM folder is a case (by default a folder is one case, its largest CT
    series)."""
    from dask.distributed import Client, as_completed

    if options.get("threads") is not None and int(options["threads"]) < 1:
        raise InputError(f"--threads-per-worker {options['threads']}: give 1 or more torch threads per worker")
    for name in ("distributed", "tornado"):  # their INFO lines would drown the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    paths = find_inputs(inputs, each_series)  # bad inputs or a bad model are refused before anything is written
    model_path = resolved_spec(model)
    model_id, settings_id = model_identity(model), settings_identity(options)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".*.partial.*"):  # staging folders of a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    summary = SummaryWriter(output, model or default_model_name(), options.get("overview", True))
    names = unique_case_names(paths)
    rows, todo, earlier = [], [], []
    for path in paths:
        try:
            os.stat(split_series_input(path)[0])
        except OSError as exc:  # a manifest row whose file is gone: a failed case, not a failed batch
            rows.append({"case": names[path], "input": path, "status": "failed", "seconds": "",
                         "error": unreadable(path, exc)})
            continue
        done = earlier_run(output / names[path], model_id, settings_id)
        if done is None:
            todo.append(path)
        else:
            earlier.append((path, done))
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        hashes = list(pool.map(hash_or_error, [path for path, _ in earlier]))
    for (path, done), (input_hash, error) in zip(earlier, hashes):
        if error is not None:
            rows.append({"case": names[path], "input": path, "status": "failed", "seconds": "", "error": error})
        elif input_hash == done["batch"]["input_sha256"]:
            rows.append({"case": names[path], "input": path, "status": "skipped", "error": "", "seconds": 0.0,
                         **_summary_row(done)})
        else:  # the input changed since
            todo.append(path)
    # largest first: on a repository of mixed scan sizes the batch does not end waiting on one big scan started last
    todo.sort(key=input_bytes, reverse=True)
    log.info("%d case(s): %d already complete, %d unreadable, %d to run", len(paths),
             sum(r["status"] == "skipped" for r in rows), sum(r["status"] == "failed" for r in rows), len(todo))
    if todo:
        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            options.setdefault("threads", max(1, (os.cpu_count() or 1) // max(1, workers)))
            options["own_workers"] = True
            cluster = local_cluster(workers, memory_limit)
            client = Client(cluster)
        try:
            if scheduler:  # local workers share this filesystem and are spawned without Dask's malloc setting
                check_cluster(client, [str(f) for f in model_folders(model)])
            futures = {client.submit(run_case, path, names[path], str(output), model_path, options, model_id,
                                     settings_id, pure=False, key=f"medanomaly-{names[path]}-{time.time_ns()}"): path
                       for path in todo}
            for n, future in enumerate(as_completed(futures), start=1):
                try:
                    row = future.result()
                except Exception as exc:  # a worker died (out of memory, killed): record and go on
                    path = futures[future]
                    row = {"case": names[path], "input": path, "status": "failed",
                           "error": f"worker lost: {type(exc).__name__}: {exc}", "seconds": ""}
                rows.append(row)
                summary.update(rows)  # the curation view stays current while the batch runs
                if progress is not None:
                    progress("batch", n / len(todo))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    summary.update(rows, final=True)
    return rows
