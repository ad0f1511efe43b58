"""The `medanomaly` command: detect's findings table, models list/show/import, info, and the API behind it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

from conftest import DEMO_CT, ROOT

import medanomaly
from medanomaly.cli import _parser, main


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


def test_installed_command_runs_quick_start(tmp_path):
    """The README's quick-start detection, as a real child process of the installed console script."""
    exe = os.path.join(os.path.dirname(sys.executable), "medanomaly")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "medanomaly.cli"]
    proc = subprocess.run([*cmd, "detect", str(DEMO_CT), "-o", str(tmp_path)], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly")))
    assert proc.returncode == 0, proc.stderr
    assert "chest_ct_demo: volume score" in proc.stdout
    assert (tmp_path / "chest_ct_demo" / "overview.png").stat().st_size > 10000
