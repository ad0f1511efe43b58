"""Distributed training through torchrun: two processes on the gloo backend (CPU) keep their weights in sync."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import DEMO_CT, ROOT


def torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("method", ["vqvae-recon", "vqvae-fs"])
def test_two_process_gloo_training_stays_in_sync(method, tmp_path):
    architecture = {"channels": [8, 16], "num_embeddings": 32, "embedding_dim": 8}
    if method == "vqvae-fs":
        architecture.update(channels=[8, 8, 16], classifier_width=16, classifier_depth=1, classifier_heads=2)
    cmd = torchrun() + ["--standalone", "--nnodes", "1", "--nproc_per_node", "2", "-m", "medanomaly.cli", "-q",
                        "train", "--method", method, "--data", str(DEMO_CT), "-o", str(tmp_path / "model"),
                        "--steps", "6", "--batch-size", "2", "--input-json", '{"size": 64, "spacing_mm": 7.0}',
                        "--architecture-json", json.dumps(architecture)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SlicerMedAnomaly"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    distributed = card["training"]["distributed"]
    assert distributed["world_size"] == 2 and distributed["backend"] == "gloo"
    assert distributed["max_parameter_divergence"] == 0.0, "the two processes' weights differ"
    assert card["training"]["losses"][-1]["step"] == 6
