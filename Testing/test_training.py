"""`medanomaly train`: a tiny real run writes a valid, calibrated bundle that detect uses; checkpoints resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file

import medanomaly
from medanomaly.bundle import ModelBundle
from medanomaly.cli import main
from medanomaly.errors import InputError
from medanomaly.training import train
from medanomaly.preprocess import DEFAULT_SLICE_MM, InputSpec
from medanomaly.training.data import SliceBuffer, slab_split

TINY = dict(steps=30, batch_size=4, checkpoint_every=10,
            input={"size": 64, "spacing_mm": 7.0, "window_hu": [-1000, 500], "region": "body",
                   "smoothing_mm": 4.0, "body_region": "chest"},
            architecture={"channels": [8, 16], "num_embeddings": 32, "embedding_dim": 8})


@pytest.fixture(scope="module")
def training_volume(demo_image, tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "normal.nii.gz"
    sitk.WriteImage(demo_image, str(path))
    return path


def test_slab_split_keeps_a_margin():
    train_z, held_z = slab_split(141, block=20, every=3, margin=3)
    assert len(set(train_z) & set(held_z)) == 0
    distance = np.abs(train_z[:, None] - held_z[None, :]).min()
    assert distance > 3
    assert len(held_z) >= 40


def test_train_writes_calibrated_bundle_used_by_detect(training_volume, tmp_path):
    bundle = train("vqvae-recon", [str(training_volume)], tmp_path / "tiny", name="tiny", seed=1,
                   split_block=10, **TINY)
    bundle.verify()
    card = bundle.card
    assert card["training"]["data"][0]["sha256"] and card["training"]["config"]["seed"] == 1
    assert card["calibration"]["reference_slices"] > 0
    assert card["training"]["codebook"]["used"] >= 1
    losses = [entry["loss"] for entry in card["training"]["losses"]]
    assert losses, "losses are logged"
    assert 0.0 < card["calibration"]["reference_share_max"] < 1.0  # the reference check's normal share
    (result,) = medanomaly.detect(training_volume, tmp_path / "out", model=str(bundle.path))
    assert result.model["name"] == "tiny"
    assert result.reference_check["available"] and result.reference_check["slices_checked"] > 0
    assert not (tmp_path / "tiny.checkpoint").exists(), "the checkpoint is removed once the bundle is written"


def test_same_seed_same_weights(training_volume, tmp_path):
    a = train("vqvae-recon", [str(training_volume)], tmp_path / "a", name="a", seed=3, split_block=10, **TINY)
    b = train("vqvae-recon", [str(training_volume)], tmp_path / "b", name="b", seed=3, split_block=10, **TINY)
    wa, wb = load_file(str(a.path / "weights.safetensors")), load_file(str(b.path / "weights.safetensors"))
    for key in wa:
        assert np.array_equal(wa[key].numpy(), wb[key].numpy()), key


def test_resume_from_checkpoint_matches_uninterrupted(training_volume, tmp_path):
    full = train("vqvae-recon", [str(training_volume)], tmp_path / "full", name="m", seed=4, split_block=10, **TINY)
    out = tmp_path / "resumed"
    checkpoint = tmp_path / "resumed.checkpoint"

    # an interruption at step 20 leaves the step-20 checkpoint behind
    def stop_at_20(step, total, parts):
        if step == 20:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train("vqvae-recon", [str(training_volume)], out, name="m", seed=4, split_block=10, progress=stop_at_20,
              **TINY)
    assert (checkpoint / "checkpoint.json").is_file()
    assert json.loads((checkpoint / "checkpoint.json").read_text())["step"] == 20
    # a run cut there can also be finished at the steps it reached; the card then says where steps 1-20 ran
    shutil.copytree(checkpoint, tmp_path / "cut.checkpoint")
    cut = train("vqvae-recon", [str(training_volume)], tmp_path / "cut", name="m", seed=4, split_block=10,
                resume=True, **dict(TINY, steps=20))
    assert cut.card["training"]["step_devices"] == [{"device": "cpu", "first_step": 1, "last_step": 20}]
    resumed = train("vqvae-recon", [str(training_volume)], out, name="m", seed=4, split_block=10, resume=True,
                    **TINY)
    wf, wr = load_file(str(full.path / "weights.safetensors")), load_file(str(resumed.path / "weights.safetensors"))
    for key in wf:
        np.testing.assert_allclose(wf[key].numpy(), wr[key].numpy(), atol=1e-5, err_msg=key)


# the gradient steps where neither the CT files nor an image reader are (a GPU node): SimpleITK cannot be imported
STEPS_FROM_SLICES = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoImageReader(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("SimpleITK", "slicerio"):
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, NoImageReader())
    from medanomaly.preprocess import InputSpec
    from medanomaly.training import train
    from medanomaly.training.data import SliceBuffer

    kwargs = json.loads(sys.argv[1])
    slices = SliceBuffer.load(sys.argv[2], InputSpec.from_card(kwargs["input"]))
    assert train("vqvae-recon", [], sys.argv[3], slices=slices, finish=False, **kwargs) is None
    assert "SimpleITK" not in sys.modules
""")


def test_steps_from_prepared_slices_then_calibration_where_the_data_are(training_volume, tmp_path):
    kwargs = dict(TINY, name="m", seed=5, split_block=10)
    full = train("vqvae-recon", [str(training_volume)], tmp_path / "full", **kwargs)
    prepared = tmp_path / "slices.safetensors"
    SliceBuffer([str(training_volume)], InputSpec.from_card(TINY["input"]), split=True, block=10).save(prepared)
    out = tmp_path / "split-run"
    env = dict(os.environ, PYTHONPATH=str(Path(medanomaly.__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", STEPS_FROM_SLICES, json.dumps(kwargs), str(prepared), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.exists() and (tmp_path / "split-run.checkpoint" / "checkpoint.json").is_file()
    finished = train("vqvae-recon", [str(training_volume)], out, resume=True, **kwargs)
    wf, ws = load_file(str(full.path / "weights.safetensors")), load_file(str(finished.path / "weights.safetensors"))
    for key in wf:
        np.testing.assert_allclose(wf[key].numpy(), ws[key].numpy(), atol=1e-5, err_msg=key)
    card, reference = finished.card, full.card
    assert card["training"]["data"] == reference["training"]["data"], "the card names the CT files and their hashes"
    assert card["training"]["step_devices"] == [{"device": "cpu", "first_step": 1, "last_step": TINY["steps"]}]
    assert card["calibration"]["reference_slices"] == reference["calibration"]["reference_slices"]
    with pytest.raises(InputError, match="prepare them again"):  # slices split otherwise than this run would
        train("vqvae-recon", [], tmp_path / "other-split", slices=SliceBuffer.load(prepared, InputSpec.from_card(
            TINY["input"])), finish=False, **dict(kwargs, split_block=20))
    with pytest.raises(ValueError, match="model expects"):
        SliceBuffer.load(prepared, InputSpec.from_card(dict(TINY["input"], size=32)))


def test_train_command_line(training_volume, tmp_path, capsys):
    code = main(["-q", "train", "--method", "vqvae-recon", "--data", str(training_volume), "-o",
                 str(tmp_path / "cli-model"), "--steps", "5", "--batch-size", "2",
                 "--input-json", json.dumps(TINY["input"]), "--architecture-json", json.dumps(TINY["architecture"])])
    assert code == 0, capsys.readouterr().err
    card = ModelBundle.load(tmp_path / "cli-model").card
    assert card["name"] == "cli-model"
    # --input-json overrides the default input spec key by key; slices thinner than 2 mm are averaged unless it says
    assert "slice_mm" not in TINY["input"] and card["input"]["slice_mm"] == DEFAULT_SLICE_MM == 2.0


def test_train_unknown_method(training_volume, tmp_path, capsys):
    code = main(["train", "--method", "nope", "--data", str(training_volume), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "no trainer" in err


def test_slice_buffer_streams_every_slice_with_bounded_memory(demo_image, tmp_path):
    """More training slices than the bound: the reservoir never grows, each refresh re-reads one volume, and over
    enough batches every slice of every volume is served; held-out slabs are read again, not kept."""
    import torch

    from medanomaly.preprocess import InputSpec
    from medanomaly.training.data import SliceBuffer

    paths = []
    for i, (z0, z1) in enumerate([(0, 30), (30, 60)]):
        paths.append(tmp_path / f"part{i}.nrrd")
        sitk.WriteImage(sitk.Shrink(demo_image[:, :, z0:z1], [4, 4, 1]), str(paths[-1]))
    spec = InputSpec.from_card({**InputSpec().to_card(), "size": 32, "spacing_mm": 14.0})
    buffer = SliceBuffer([str(p) for p in paths], spec, split=False, max_slices=8, refresh_every=1, seed=0)
    total = sum(buffer.counts)
    assert buffer.streaming and total > 20 and len(buffer) == 8
    seen = {tuple(o) for o in buffer.origins.tolist()}
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        images, regions = buffer.batch(4, g)
        assert images.shape == (4, 1, 32, 32) and len(buffer) == 8  # bounded
        seen |= {tuple(o) for o in buffer.origins.tolist()}
    assert len(seen) == total  # every training slice of both volumes was held at some point
    assert {v for v, _ in seen} == {0, 1}
    split = SliceBuffer([str(paths[0])], spec, split=True, block=5, every=3, margin=1)
    held = list(split.heldout())
    assert len(held) == 1 and held[0][1].size > 0 and split.heldout_paths == [str(paths[0])]
