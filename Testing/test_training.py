"""`medanomaly train`: a tiny real run writes a valid, calibrated bundle that detect uses; checkpoints resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file

import medanomaly
from medanomaly.bundle import ModelBundle
from medanomaly.cli import main
from medanomaly.training import train
from medanomaly.training.data import slab_split

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
    (result,) = medanomaly.detect(training_volume, tmp_path / "out", model=str(bundle.path))
    assert result.model["name"] == "tiny"
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
    resumed = train("vqvae-recon", [str(training_volume)], out, name="m", seed=4, split_block=10, resume=True,
                    **TINY)
    wf, wr = load_file(str(full.path / "weights.safetensors")), load_file(str(resumed.path / "weights.safetensors"))
    for key in wf:
        np.testing.assert_allclose(wf[key].numpy(), wr[key].numpy(), atol=1e-5, err_msg=key)


def test_train_command_line(training_volume, tmp_path, capsys):
    code = main(["-q", "train", "--method", "vqvae-recon", "--data", str(training_volume), "-o",
                 str(tmp_path / "cli-model"), "--steps", "5", "--batch-size", "2",
                 "--input-json", json.dumps(TINY["input"]), "--architecture-json", json.dumps(TINY["architecture"])])
    assert code == 0, capsys.readouterr().err
    assert ModelBundle.load(tmp_path / "cli-model").card["name"] == "cli-model"


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
