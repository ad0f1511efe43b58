"""2.5D input (the card's input.context_slices): each slice goes to the network with its neighbours along S as extra
channels, in training and in detection, without leaking held-out slabs into training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medanomaly
from medanomaly.bundle import resolve_model
from medanomaly.detectors.vqvae_fs import VQVAEFeatureSynthesisDetector
from medanomaly.detectors.vqvae_recon import VQVAEReconstructionDetector
from medanomaly.engine import run_detector
from medanomaly.errors import InputError, ModelError
from medanomaly.preprocess import InputSpec, ModelGrid, ModelSlices, with_context
from medanomaly.training import train
from medanomaly.training.data import SliceBuffer

TINY_ARCH = {"channels": [8, 8, 8], "num_embeddings": 16, "embedding_dim": 8, "classifier_width": 16,
             "classifier_depth": 1, "classifier_heads": 2}


def context_detector(context: int) -> VQVAEFeatureSynthesisDetector:
    torch.manual_seed(0)
    card = {"input": {"size": 32, "spacing_mm": 7.0, "window_hu": [-1000, 500], "context_slices": context},
            "architecture": TINY_ARCH}
    detector = VQVAEFeatureSynthesisDetector(card).eval()
    with torch.no_grad():  # codebook entries drawn from real encodings, so that different inputs get different codes
        encodings = detector.vqvae.encode(torch.rand(4, detector.spec.channels, 32, 32)).permute(0, 2, 3, 1)
        detector.codebook.copy_(encodings.reshape(-1, encodings.shape[-1])[:16])
    return detector


def test_context_stack_orders_the_neighbours_and_repeats_the_edge_slices():
    slices = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 2, 2)
    stack = with_context(slices, [0, 3, 5], 2)
    assert stack.shape == (3, 5, 2, 2)
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [1, 2, 3, 4, 5], [3, 4, 5, 5, 5]]
    assert with_context(slices, range(2, 4), 0)[:, :, 0, 0].tolist() == [[2], [3]]
    assert InputSpec(context_slices=2).channels == 5
    assert InputSpec.from_card(InputSpec(context_slices=2).to_card()).context_slices == 2
    assert "context_slices" not in InputSpec().to_card()  # cards without it stay as they were


def test_the_engine_gives_each_slice_its_neighbours_and_maps_the_middle_one():
    """Changing one slice changes the raw maps of exactly the slices that see it: itself and its context."""
    detector = context_detector(1)
    hu = torch.rand(6, 32, 32) * 1500 - 1000
    region = np.ones((6, 32, 32), bool)
    grid = ModelGrid(native_shape=(32, 32), resized_shape=(32, 32), offset=(0, 0), size=32)

    def raw_maps(volume: torch.Tensor) -> np.ndarray:
        slices = ModelSlices(hu=volume, region=region, body=region, spacing_mm=(2.0, 7.0, 7.0), grid=grid)
        return run_detector(detector, slices, device=torch.device("cpu"))[0]

    before = raw_maps(hu)
    changed = hu.clone()
    changed[3] = changed[3].flip(0)
    after = raw_maps(changed)
    differs = [not np.allclose(a, b) for a, b in zip(before, after)]
    assert differs == [False, False, True, True, True, False]
    # slice 3's map is the middle channel's: the same as scoring the stack by hand
    stack = with_context(changed.sub(-1000).div(1500).clamp(0, 1), [3], 1)
    with torch.no_grad():
        by_hand = detector.score(stack, torch.ones(1, 1, 32, 32, dtype=torch.bool)).score[0, 0].numpy()
    np.testing.assert_allclose(after[3], by_hand, rtol=1e-4, atol=1e-6)


def test_methods_without_context_refuse_context_slices():
    card = {"input": {"size": 32, "spacing_mm": 7.0, "window_hu": [-1000, 500], "context_slices": 1},
            "architecture": {"channels": [8, 8], "num_embeddings": 16, "embedding_dim": 8}}
    with pytest.raises(ModelError, match="context_slices must be 0"):
        VQVAEReconstructionDetector(card)
    with pytest.raises(AssertionError, match=r"expected \[B, 3, H, W\]"):
        context_detector(1).score(torch.rand(1, 1, 32, 32), torch.ones(1, 1, 32, 32, dtype=torch.bool))


def test_training_slices_carry_their_context_and_never_reach_a_held_out_slab(demo_image, tmp_path):
    path = tmp_path / "normal.nrrd"
    sitk.WriteImage(sitk.Shrink(demo_image, [4, 4, 1]), str(path))
    spec = InputSpec(size=32, spacing_mm=14.0, context_slices=2)
    buffer = SliceBuffer([str(path)], spec, split=True, block=5, every=3, margin=2)
    assert buffer.images.shape[1:] == (5, 32, 32)
    (slices, held), = list(buffer.heldout())
    windowed = slices.windowed(spec)
    for image, (_, z) in zip(buffer.images, buffer.origins.tolist()):
        # channels are slices z-2 .. z+2 (edges repeated), the middle one is the training slice itself
        expected = windowed[np.clip(np.arange(z - 2, z + 3), 0, windowed.shape[0] - 1)]
        torch.testing.assert_close(image, expected)
        assert np.abs(np.arange(z - 2, z + 3)[:, None] - held[None, :]).min() > 0, "context reaches a held-out slice"
    with pytest.raises(InputError, match="reaches past the slab split's margin"):
        SliceBuffer([str(path)], spec, split=True, block=5, every=3, margin=1)


def test_a_context_model_trains_calibrates_and_detects_on_the_input_grid(demo_image, tmp_path):
    path = tmp_path / "normal.nii.gz"
    sitk.WriteImage(demo_image, str(path))
    bundle = train("vqvae-fs", [str(path)], tmp_path / "ctx", name="ctx", steps=6, batch_size=2,
                   input={"size": 64, "spacing_mm": 7.0, "window_hu": [-1000, 500], "region": "body",
                          "body_region": "chest", "slice_mm": 2.0, "context_slices": 2},
                   architecture={**TINY_ARCH, "stage1_fraction": 0.5}, split_block=4, split_every=3, split_margin=2,
                   checkpoint_every=3)
    bundle.verify()
    assert bundle.card["input"]["context_slices"] == 2
    assert bundle.card["calibration"]["reference_slices"] > 0
    assert bundle.tensors()["vqvae.encoder.blocks.0.conv.weight"].shape[1] == 5  # five slices in
    (result,) = medanomaly.detect(path, tmp_path / "out", model=str(bundle.path))
    heatmap = sitk.ReadImage(str(tmp_path / "out" / "normal" / "heatmap.nrrd"))
    assert heatmap.GetSize() == demo_image.GetSize() and heatmap.GetSpacing() == pytest.approx(demo_image.GetSpacing())
    assert heatmap.GetOrigin() == pytest.approx(demo_image.GetOrigin())
    assert heatmap.GetDirection() == pytest.approx(demo_image.GetDirection())
    findings = json.loads((tmp_path / "out" / "normal" / "findings.json").read_text())
    assert findings["model"]["name"] == "ctx" and np.isfinite(result.volume_score)


def test_the_shipped_context_model_detects_on_the_demo_ct(demo_image, tmp_path):
    """The catalog's 2.5D bundle loads with this software (five input channels) and its outputs lie on the grid."""
    bundle = resolve_model("chest-ct-vqvae-fs-256-context")
    bundle.verify()
    assert bundle.card["input"]["context_slices"] == 2 and bundle.card["min_software_version"] == "0.4.0"
    path = tmp_path / "demo.nii.gz"
    sitk.WriteImage(demo_image, str(path))
    (result,) = medanomaly.detect(path, tmp_path / "out", model="chest-ct-vqvae-fs-256-context")
    image, heatmap = demo_image, sitk.ReadImage(str(tmp_path / "out" / "demo" / "heatmap.nrrd"))
    assert heatmap.GetSize() == image.GetSize() and heatmap.GetOrigin() == pytest.approx(image.GetOrigin())
    assert result.model["name"] == "chest-ct-vqvae-fs-256-context" and 0.0 <= result.volume_score <= 1.0
