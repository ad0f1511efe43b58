"""The `medanomaly` command: detect's findings table, models list/show/import, info, and the API behind it."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk
from conftest import DEMO_CT, ROOT, denser_tissue

import medanomaly
from medanomaly.cli import _parser, main


def run_command(*args: str) -> subprocess.CompletedProcess:
    """The installed `medanomaly` console script (or `python -m medanomaly.cli`) as a real child process."""
    exe = os.path.join(os.path.dirname(sys.executable), "medanomaly")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "medanomaly.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly")))


def test_detect_prints_findings_table(small_ct_file, default_model, tmp_path, capsys):
    code = main(["-q", "detect", str(small_ct_file), "-o", str(tmp_path), "--model", str(default_model)])
    assert code == 0
    code = main(["detect", str(small_ct_file), "-o", str(tmp_path), "--sensitivity", "1", "--progress-lines"])
    out = capsys.readouterr().out
    assert code == 0
    assert "small_ct: volume score" in out
    assert "PROGRESS network 1.000" in out


def test_every_detect_flag_is_a_keyword_of_detect():
    detect_parser = _parser()._subparsers._group_actions[0].choices["detect"]
    flags = {a.dest for a in detect_parser._actions if a.dest not in ("help", "inputs", "progress_lines",
                                                                        "no_overview")}
    keywords = set(inspect.signature(medanomaly.detect).parameters)
    assert flags - {"output"} <= keywords, flags - keywords
    assert "overview" in keywords


def test_models_list_show_and_info(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "chest-ct-vqvae-fs-256 (default)" in out
    assert main(["models", "show", "chest-ct-vqvae-recon"]) == 0
    out = capsys.readouterr().out
    assert '"method": "vqvae-recon"' in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "CUDA" in out and "model folders" in out
    from importlib.metadata import version

    assert f"highdicom {version('highdicom')}" in out and f"dask {version('dask')}" in out


def test_installed_command_runs_quick_start(tmp_path):
    """The README's quick-start detection, as a real child process of the installed console script."""
    proc = run_command("detect", str(DEMO_CT), "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "chest_ct_demo: volume score" in proc.stdout
    assert (tmp_path / "chest_ct_demo" / "overview.png").stat().st_size > 10000


def test_detect_warns_about_slices_unlike_the_normal_reference(small_ct, small_ct_file, default_model, tmp_path):
    """The reference check, through the real command in a child process: the real chest CT passes; the same CT
    with every tissue voxel 250 HU denser (a scanner far off its HU calibration, say) is reported slice by slice."""
    shifted = denser_tissue(small_ct)
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nrrd"))
    records = {}
    for path in (small_ct_file, tmp_path / "shifted.nrrd"):
        proc = run_command("--quiet", "detect", str(path), "-o", str(tmp_path / "out"), "--model", str(default_model))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((tmp_path / "out" / path.name.split(".")[0] / "findings.json").read_text())
        records[path.name] = (summary, proc.stderr)
    normal, normal_log = records["small_ct.nrrd"]
    assert normal["reference_check"]["available"]
    assert normal["reference_check"]["slices_checked"] == 24 and normal["reference_check"]["slices_unlike"] == 0
    assert normal["warnings"] == [] and "unlike" not in normal_log
    unusual, unusual_log = records["shifted.nrrd"]
    check = unusual["reference_check"]
    assert check["slices_unlike"] > 0 and check["max_ratio"] >= check["factor"]
    z = sorted(shifted.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(shifted.GetDepth()))
    assert all(z[0] <= lo <= hi <= z[-1] for lo, hi in check["unlike_s_mm"])
    (warning,) = unusual["warnings"]
    assert warning.startswith(f"{check['slices_unlike']} of 24 slices (S ")
    assert "look unlike the model's normal reference" in warning and warning in unusual_log


@pytest.mark.skipif(os.name != "posix", reason="closes the child's stderr with preexec_fn (POSIX)")
def test_detect_on_a_dicom_folder_without_stderr(small_ct, tmp_path):
    """A windowed process (pythonw, a GUI's child) has no stderr at all: reading a DICOM series, which captures the
    decoders' stderr, still works and writes the case."""
    from conftest import write_dicom_series

    folder = tmp_path / "series"
    write_dicom_series(small_ct[:, :, :8], folder)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"))
    command = [sys.executable, "-m", "medanomaly.cli", "-q", "detect", str(folder), "-o", str(tmp_path / "out"),
               "--model", "chest-ct-hu-outlier", "--no-overview"]
    run = subprocess.run(command, preexec_fn=lambda: os.close(2), stdout=subprocess.PIPE, env=env, timeout=300)
    assert run.returncode == 0
    assert (tmp_path / "out" / "series" / "findings.json").is_file()
