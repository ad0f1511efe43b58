"""`medanomaly batch`: a real Dask scheduler and workers on loopback, the ranked summary, failures recorded,
re-runs that skip completed cases, and recovery after kill -9."""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser

import pytest
import SimpleITK as sitk
from conftest import ROOT

from medanomaly.batch import (SummaryWriter, batch, find_inputs, local_cluster, workers_missing,
                              workers_with_dask_malloc_trim)

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))


def read_summary(folder):
    with open(folder / "summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def repository(small_ct, tmp_path_factory):
    """A small 'repository': two normal scans, one with a dense mass, one corrupt file, in nested folders."""
    from test_outputs import insert_nodule

    root = tmp_path_factory.mktemp("repo")
    (root / "site_a").mkdir()
    (root / "site_b" / "deep").mkdir(parents=True)
    sitk.WriteImage(small_ct[:, :, :16], str(root / "site_a" / "normal1.nii.gz"))
    sitk.WriteImage(small_ct[:, :, 8:24], str(root / "site_b" / "normal2.nrrd"))
    lesion, _ = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    sitk.WriteImage(lesion, str(root / "site_b" / "deep" / "mass.nii.gz"))
    (root / "site_a" / "broken.nii.gz").write_bytes(b"not an image")
    return root


def test_find_inputs_folders_globs_and_manifest(repository, tmp_path):
    found = find_inputs([str(repository)])
    assert [os.path.basename(p) for p in found] == ["broken.nii.gz", "normal1.nii.gz", "normal2.nrrd", "mass.nii.gz"]
    assert len(find_inputs([str(repository / "**" / "*.nii.gz")])) == 3
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"path\n{repository / 'site_a' / 'normal1.nii.gz'}\n")
    assert find_inputs([str(manifest)]) == [str(repository / "site_a" / "normal1.nii.gz")]


def test_each_ct_series_of_a_study_folder_is_a_case(small_ct, default_model, tmp_path):
    """A study folder with two CT reconstructions and an MR series: one case (its largest CT series, the choice in
    findings.json's warnings) by default; with each_series one case per CT series, named by folder and series UID,
    each scored on its own slices, skipped on a re-run, and the summary's input is what detect takes. A manifest
    row can name the series too."""
    from conftest import write_dicom_series

    import medanomaly

    study = tmp_path / "repo" / "study1"
    write_dicom_series(small_ct, study, series_uid="1.2.3.24", description="thin")
    write_dicom_series(small_ct[:, :, :12], study, series_uid="1.2.3.12", description="thick")
    write_dicom_series(small_ct[:, :, :8], study, modality="MR", series_uid="1.2.3.99", description="mr")
    assert find_inputs([str(tmp_path / "repo")]) == [str(study)]
    assert find_inputs([str(tmp_path / "repo")], each_series=True) == [f"{study} [series 1.2.3.12]",
                                                                       f"{study} [series 1.2.3.24]"]
    options = dict(model=str(default_model), workers=1, overview=False)
    (one,) = batch([str(tmp_path / "repo")], tmp_path / "one", **options)
    assert one["case"] == "study1" and one["status"] == "ok"
    summary = json.loads((tmp_path / "one" / "study1" / "findings.json").read_text(encoding="utf-8"))
    assert summary["series_uid"] == "1.2.3.24" and any("holds 3 series" in w for w in summary["warnings"])

    out = tmp_path / "each"
    rows = batch([str(tmp_path / "repo")], out, each_series=True, **options)
    assert sorted((r["case"], r["status"]) for r in rows) == [("study1-series-1.2.3.12", "ok"),
                                                              ("study1-series-1.2.3.24", "ok")]
    for uid, slices in (("1.2.3.12", 12), ("1.2.3.24", 24)):
        summary = json.loads((out / f"study1-series-{uid}" / "findings.json").read_text(encoding="utf-8"))
        assert summary["series_uid"] == uid and summary["geometry"]["size"][2] == slices
        assert not summary["warnings"]
    listed = {r["case"]: r["input"] for r in read_summary(out)}
    assert listed["study1-series-1.2.3.12"] == f"{study} [series 1.2.3.12]"
    assert {r["case"]: r["series_uid"] for r in read_summary(out)} == {"study1-series-1.2.3.12": "1.2.3.12",
                                                                       "study1-series-1.2.3.24": "1.2.3.24"}
    assert read_summary(tmp_path / "one")[0]["series_uid"] == "1.2.3.24", "the series a folder's case examined"
    (direct,) = medanomaly.detect(listed["study1-series-1.2.3.12"], model=str(default_model))
    assert direct.volume.series_uid == "1.2.3.12" and direct.labels.shape[0] == 12
    again = batch([str(tmp_path / "repo")], out, each_series=True, **options)
    assert sorted(r["status"] for r in again) == ["skipped", "skipped"]

    # exported media: a DICOMDIR index at the top and the series in folders below it; the index is no case
    media = tmp_path / "cd"
    files = write_dicom_series(small_ct[:, :, :8], media / "DICOM" / "ST0" / "SE0")
    shutil.copy(files[0], media / "DICOMDIR")  # a DICOM file, as a real index is (header, preamble)
    assert find_inputs([str(media)]) == [str(media / "DICOM" / "ST0" / "SE0")]
    # a series folder that also holds a desktop's hidden file and a note (read before the images in name order)
    (media / "DICOM" / "ST0" / "SE0" / ".DS_Store").write_bytes(b"\0" * 200)
    (media / "DICOM" / "ST0" / "SE0" / "0_readme.txt").write_text("scanned 2026", encoding="utf-8")
    assert find_inputs([str(media)]) == [str(media / "DICOM" / "ST0" / "SE0")]

    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"path,series\n{study},1.2.3.12\n{study},\n", encoding="utf-8")
    assert find_inputs([str(manifest)]) == [f"{study} [series 1.2.3.12]", str(study)]


def test_local_workers_rank_record_failures_and_skip_on_rerun(repository, default_model, tmp_path):
    out = tmp_path / "out"
    rows = batch([str(repository)], out, model=str(default_model), workers=2, memory_limit="2GB",
                 sensitivity=0.9, overview=False)
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok", "ok"]
    summary = read_summary(out)
    assert [r["rank"] for r in summary] == ["1", "2", "3", "4"]
    assert summary[0]["case"] == "mass", "the scan with a dense mass ranks first"
    assert summary[-1]["case"] == "broken" and summary[-1]["status"] == "failed"
    assert "not a readable image" in summary[-1]["error"]
    scores = [float(r["volume_score"]) for r in summary[:3]]
    assert scores == sorted(scores, reverse=True)
    p_values = [float(r["volume_p_value"]) for r in summary[:3]]  # the ranking key: 1 - score, unrounded
    assert p_values == sorted(p_values)
    assert all(abs(s + p - 1.0) < 1e-5 for s, p in zip(scores, p_values))
    # the reference check ran on every case; one dense mass leaves the real chest CT like the normal reference
    assert [r["slices_unlike_reference"] for r in summary] == ["0", "0", "0", ""]
    assert [r["body_outside_field_of_view_pct"] for r in summary] == ["0.0", "0.0", "0.0", ""]
    for case in ("normal1", "normal2", "mass"):
        assert (out / case / "heatmap.nrrd").is_file()
    assert "<img" not in (out / "report.html").read_text(encoding="utf-8"), "no overview written, none shown"
    again = batch([str(repository)], out, model=str(default_model), workers=1, sensitivity=0.9, overview=False)
    assert sorted(r["status"] for r in again) == ["failed", "skipped", "skipped", "skipped"]
    # other settings would write other findings: the cases run again, and the files say which settings made them
    stricter = batch([str(repository)], out, model=str(default_model), workers=1, sensitivity=0.2, overview=False)
    assert sorted(r["status"] for r in stricter) == ["failed", "ok", "ok", "ok"]
    assert json.loads((out / "mass" / "findings.json").read_text())["settings"]["sensitivity"] == 0.2


def test_workers_hash_new_inputs_and_a_changed_input_runs_again(small_ct, default_model, tmp_path, monkeypatch):
    """The batch's own process hashes only the inputs an earlier run completed with this model and settings (a spy
    on the real hash function counts them; the workers are other processes and hash what they run): none on a first
    run. A re-run skips a case whose input is unchanged and runs again one whose content changed."""
    import medanomaly.batch as batch_module

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(2):
        sitk.WriteImage(small_ct[:, :, 4 * i:4 * i + 12], str(inputs / f"scan{i}.nii.gz"))
    hashed = []
    real = batch_module.content_hash
    monkeypatch.setattr(batch_module, "content_hash", lambda path: hashed.append(os.path.basename(path)) or real(path))
    first = batch([str(inputs)], out, model=str(default_model), workers=1, overview=False)
    assert [r["status"] for r in first] == ["ok", "ok"] and hashed == []
    recorded = json.loads((out / "scan0" / "findings.json").read_text())["batch"]["input_sha256"]
    assert recorded == real(str(inputs / "scan0.nii.gz")), "the worker records the input's content hash"
    again = batch([str(inputs)], out, model=str(default_model), workers=1, overview=False)
    assert sorted(r["status"] for r in again) == ["skipped", "skipped"] and sorted(hashed) == ["scan0.nii.gz",
                                                                                                 "scan1.nii.gz"]
    sitk.WriteImage(small_ct[:, :, 10:22], str(inputs / "scan0.nii.gz"))  # new content under the same name
    changed = {r["case"]: r["status"] for r in batch([str(inputs)], out, model=str(default_model), workers=1,
                                                      overview=False)}
    assert changed == {"scan0": "ok", "scan1": "skipped"}
    assert json.loads((out / "scan0" / "findings.json").read_text())["batch"]["input_sha256"] != recorded


class ReportParser(HTMLParser):
    """The rows of report.html: each row's class, its cells' text and the links and images it holds."""

    def __init__(self):
        super().__init__()
        self.rows, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append({"class": attrs.get("class"), "cells": [], "href": [], "src": []})
        elif self.rows and tag in ("td", "th"):
            self.rows[-1]["cells"].append("")
        elif self.rows and tag in ("a", "img"):
            self.rows[-1]["href" if tag == "a" else "src"].append(attrs["href" if tag == "a" else "src"])

    def handle_data(self, data):
        if self.rows and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1] += data


def test_report_html_shows_the_ranking_with_overviews(repository, default_model, tmp_path):
    out = tmp_path / "out"
    batch([str(repository)], out, model=str(default_model), workers=1, sensitivity=0.9)
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(page)
    header, rows = parser.rows[0], parser.rows[1:]
    assert header["cells"][:4] == ["rank", "overview", "case", "volume p-value"]
    summary = read_summary(out)
    # the ranking of summary.csv: each case's name, then its input's path
    assert [r["cells"][2] for r in rows] == [s["case"] + s["input"] for s in summary]
    assert [r["cells"][0] for r in rows] == ["1", "2", "3", "4"]
    for row, line in zip(rows, summary):
        if line["status"] == "ok":
            # the overview image and findings.json of the case, by links relative to the output folder
            assert row["src"] == [f"{line['case']}/overview.png"] and (out / row["src"][0]).is_file()
            assert f"{line['case']}/findings.json" in row["href"]
            assert row["cells"][3] == f"{float(line['volume_p_value']):.2g}"
            assert row["cells"][5] == line["findings"]
        else:
            assert row["class"] == "failed" and row["src"] == [] and "not a readable image" in row["cells"][8]
    assert "script" not in parser.tags and "http" not in page, "self-contained: nothing runs or is fetched"
    assert not list(out.glob(".report.html.tmp*"))


def test_report_escapes_case_names_and_stays_ascii(tmp_path):
    """Case names and errors are text, never markup; links to a case's files are URL-encoded; the page is ASCII."""
    from urllib.parse import unquote

    from medanomaly.batch import write_summary

    name = 'Patient <1> & "M\u00fcller"'
    rows = [{"case": name, "input": f"/data/{name}.nii.gz", "status": "ok", "error": "", "seconds": 1.0,
             "volume_score": 0.9, "volume_p_value": 0.1, "findings": 0},
            {"case": "bad", "input": "/data/bad.nii.gz", "status": "failed", "seconds": "",
             "error": "not a readable image <script>alert(1)</script>"}]
    write_summary(rows, tmp_path, "a model", overview=True)
    raw = (tmp_path / "report.html").read_bytes()
    assert raw.isascii()
    parser = ReportParser()
    parser.feed(raw.decode("ascii"))
    assert "script" not in parser.tags
    first, second = parser.rows[1:]
    assert first["cells"][2] == name + f"/data/{name}.nii.gz"
    assert [unquote(link) for link in first["src"]] == [f"{name}/overview.png"]
    assert second["class"] == "failed" and "<script>alert(1)</script>" in second["cells"][8]
    assert read_summary(tmp_path)[0]["case"] == name, "summary.csv is UTF-8 whatever the locale"


def test_manifest_that_is_not_utf8_is_one_line(tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_bytes(b"path\nscan_\xe9.nii.gz\n")  # Latin-1
    run = subprocess.run([sys.executable, "-m", "medanomaly.cli", "batch", str(manifest), "-o", str(tmp_path / "out")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "not UTF-8 text" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_summary_rewrites_pace_themselves_by_their_cost(tmp_path):
    """summary.csv and report.html are rewritten after a case only once 10x the last rewrite's time has passed
    (a clock that the test moves stands in for the time a long listing takes to write), and always at the end."""
    times = iter([0.0, 1.0, 5.0, 10.5, 10.6, 10.8, 10.9, 11.0])  # each rewrite reads the clock before and after
    writer = SummaryWriter(tmp_path, "a model", overview=False, clock=lambda: next(times))
    rows = [{"case": f"case{i}", "input": f"case{i}.nii.gz", "status": "ok", "error": "", "seconds": 1.0,
             "volume_score": 0.5, "volume_p_value": 0.5, "findings": 0} for i in range(5)]
    written = []
    for n in range(1, 5):
        written.append((writer.update(rows[:n]), len(read_summary(tmp_path))))
    written.append((writer.update(rows, final=True), len(read_summary(tmp_path))))
    # written at once (cost 1 s), skipped at 5 s, written at 10.5 s (cost 0.1 s), skipped 0.3 s later, at the end
    assert written == [(True, 1), (False, 1), (True, 3), (False, 3), (True, 5)]
    assert "case4" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_largest_cases_run_first(small_ct, default_model, tmp_path):
    """Mixed scan sizes: the biggest scans start first, so a batch does not end waiting on one started last."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, slices in (("a_small", 8), ("b_large", 24), ("c_medium", 16)):
        sitk.WriteImage(small_ct[:, :, :slices], str(folder / f"{name}.nii.gz"))
    rows = batch([str(folder)], tmp_path / "out", model=str(default_model), workers=1, overview=False)
    assert [r["case"] for r in rows] == ["b_large", "c_medium", "a_small"]  # one worker: the order they ran in


@pytest.fixture(scope="module")
def local_client():
    """Two local worker processes as `batch` starts them."""
    from dask.distributed import Client

    with local_cluster(2, "1GB") as cluster, Client(cluster) as client:
        assert len(client.run(os.getpid)) == 2
        yield client


def test_local_workers_are_spawned_without_dasks_malloc_trim(local_client):
    """Dask's MALLOC_TRIM_THRESHOLD_ makes a case 40% slower (see local_cluster); our workers must not inherit it,
    and the batch's own process must not be left with it either."""
    assert workers_with_dask_malloc_trim(local_client) == []
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ


def _profiles_and_ticks(dask_worker):
    return "profile" in dask_worker.periodic_callbacks, dask_worker.periodic_callbacks["tick"].callback_time


def _ticks(dask_scheduler):
    return dask_scheduler.periodic_callbacks["tick"].callback_time


def test_local_cluster_spares_the_cores_dasks_housekeeping(local_client):
    """No statistical profiler in the workers (it samples their stacks every 10 ms for a dashboard there is none of),
    and event-loop health checks every second instead of every 20 ms (see LOCAL_CLUSTER_CONFIG)."""
    assert set(local_client.run(_profiles_and_ticks).values()) == {(False, 1000.0)}
    assert local_client.run_on_scheduler(_ticks) == 1000.0


def _frozen_after_the_model_loads():
    from medanomaly.batch import worker_scorer

    worker_scorer(None, True)
    return gc.get_freeze_count()


def test_own_workers_freeze_what_loading_the_model_leaves(local_client):
    """torch, MONAI and the model stay for a local worker's whole life: frozen, Python's garbage collections skip
    them, during the cases and at exit (a worker's exit took about 1 s, then 0.2 s)."""
    assert all(count > 0 for count in local_client.run(_frozen_after_the_model_loads).values())


def test_workers_report_model_folders_they_cannot_see(local_client, tmp_path):
    """A cluster without the shared filesystem the batch assumes: each worker checks the folders itself."""
    models, absent = str(ROOT / "models"), str(tmp_path / "not-on-the-workers")
    blind = workers_missing(local_client, [models, absent])
    assert len(blind) == 2 and all(missing == [absent] for missing in blind.values())
    assert workers_missing(local_client, [models]) == {}


def test_existing_dask_cluster_on_loopback(repository, default_model, tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"], env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    # one worker as `dask worker` starts it by default (with Dask's MALLOC_TRIM_THRESHOLD_), one configured as the
    # README tells cluster administrators to
    unset = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}'}
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                 "--no-dashboard", "--memory-limit", "2GB", "--name", name], env=dict(ENV, **extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name, extra in (("dask-default", {}), ("configured", unset))]
    try:
        from dask.distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info()["workers"]) == 2:
                        names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
                        assert workers_with_dask_malloc_trim(client) == [names["dask-default"]]
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the scheduler and two workers did not come up"
            time.sleep(0.5)
        with caplog.at_level("WARNING", logger="medanomaly.batch"):
            rows = batch([str(repository / "site_b")], tmp_path / "out", model=str(default_model),
                         scheduler=address, overview=False)
        assert sorted(r["status"] for r in rows) == ["ok", "ok"]
        assert "1 of the cluster's workers run with MALLOC_TRIM_THRESHOLD_" in caplog.text
    finally:
        for process in workers + [scheduler]:
            process.terminate()
        for process in workers + [scheduler]:
            process.wait(30)


def test_kill_9_loses_no_completed_case_and_recomputes_none(small_ct, default_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        sitk.WriteImage(small_ct[:, :, i:i + 12], str(inputs / f"scan{i}.nii.gz"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medanomaly.cli", "-q", "batch", str(inputs), "-o", str(out), "--workers", "1",
           "--model", str(default_model), "--no-overview"]
    process = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ((out / "summary.csv").exists() and len(read_summary(out)) >= 2):
        assert process.poll() is None, "the batch ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert 2 <= len(finished) < 6
    for case in finished:  # every case folder present is complete
        assert (out / case / "findings.json").is_file() and (out / case / "anomalies.seg.nrrd").is_file()
    rows = batch([str(inputs)], out, model=str(default_model), workers=1, overview=False)
    skipped = {r["case"] for r in rows if r["status"] == "skipped"}
    recomputed = {r["case"] for r in rows if r["status"] == "ok"}
    assert skipped == finished, "no completed case is lost or recomputed"
    assert recomputed == {f"scan{i}" for i in range(6)} - finished
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "partial" in p.name]


def test_bad_threads_per_worker_is_one_line_and_writes_nothing(repository, tmp_path):
    out = tmp_path / "never"
    run = subprocess.run([sys.executable, "-m", "medanomaly.cli", "batch", str(repository), "-o", str(out),
                          "--threads-per-worker", "0"], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "--threads-per-worker 0" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()


def test_manifest_row_without_a_file_is_a_failed_case(repository, default_model, tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"path\n{repository / 'site_a' / 'normal1.nii.gz'}\nmissing/gone.nii.gz\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "medanomaly.cli", "-q", "batch", str(manifest), "-o", str(out),
                          "--model", str(default_model), "--workers", "1", "--no-overview"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 4 and "Traceback" not in run.stderr  # some case failed; the batch itself ran
    summary = {r["case"]: r for r in read_summary(out)}
    assert summary["normal1"]["status"] == "ok" and (out / "normal1" / "heatmap.nrrd").is_file()
    assert summary["gone"]["status"] == "failed" and "check the path" in summary["gone"]["error"]
    assert not (out / "gone").exists()


def test_batch_main_process_does_not_load_torch():
    """The batch's own process only names, hashes and schedules: torch and the detectors load in the workers, so
    the command starts in a fraction of a second (the import alone was about 1 s of every batch's start-up)."""
    code = ("import sys, medanomaly.cli, medanomaly.batch, medanomaly.ensemble; "
            "print(sorted(m for m in ('torch', 'monai', 'scipy.ndimage', 'medanomaly.detectors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
