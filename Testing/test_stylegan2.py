"""StyleGAN2 method: network shapes and gradients, the vectorised patch Wasserstein distance against scipy, that
inversion lowers its loss, the training losses, and that the explanation direction separates two latent clusters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.stats import wasserstein_distance

from conftest import DEMO_CT
from medanomaly.detectors.stylegan2 import (DEFAULT_ARCHITECTURE, Encoder, Generator, ModulatedConv2d, StyleGAN2Detector,
                                            patch_mse, patch_wasserstein, patches_to_pixels, ramped_lr)
from medanomaly.bundle import sha256_of
from medanomaly.cli import main
from medanomaly.errors import InputError
from medanomaly.explain import latent_direction
from medanomaly.preprocess import InputSpec

SMALL = {"resolution": 32, "z_dim": 16, "w_dim": 16, "mapping_layers": 2, "channel_base": 128, "channel_max": 16,
         "encoder_channel_max": 16, "patch_size": 8, "patch_stride": 4, "inversion_steps": 5}


def small_card(**arch):
    return {"name": "tiny-gan", "version": "0", "method": "stylegan2",
            "input": {**InputSpec().to_card(), "size": 32, "spacing_mm": 14.0},
            "architecture": {**DEFAULT_ARCHITECTURE, **SMALL, **arch}}


def test_generator_encoder_shapes_and_gradients():
    torch.manual_seed(0)
    g = Generator(32, 16, 16, 2, 128, 16)
    assert g.num_ws == 8  # 2 * (log2(32) - 1)
    ws = g.map(torch.randn(3, 16))
    assert ws.shape == (3, 8, 16)
    ws = ws.detach().clone().requires_grad_(True)
    image = g(ws, noise_mode="random")
    assert image.shape == (3, 1, 32, 32)
    image.square().mean().backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in g.named_parameters() if "mapping" not in n)
    e = Encoder(32, g.num_ws, 16, 128, 16)
    assert e(image.detach()).shape == (3, 8, 16)
    with pytest.raises(ValueError):
        Generator(48)


def test_modulated_convolution_equals_per_sample_weights():
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, 16)
    x, w = torch.randn(3, 5, 8, 8), torch.randn(3, 16)
    style = conv.affine(w)
    expected = []
    for i in range(3):
        weight = conv.scale * conv.weight[0] * style[i][None, :, None, None]
        weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        expected.append(torch.nn.functional.conv2d(x[i:i + 1], weight, padding=1))
    torch.testing.assert_close(conv(x, w), torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_augmentation_translation_equals_grid_sample_and_has_second_derivatives():
    """DiffAugment's translation equals a translation-only F.grid_sample, and, unlike CUDA's grid sampler, it can be
    differentiated twice (the R1 penalty's gradient of a gradient runs through it)."""
    import torch.nn.functional as F

    from medanomaly.training.stylegan2 import translate

    x = torch.randn(4, 2, 32, 40, generator=torch.Generator().manual_seed(0))
    shift = (torch.rand(4, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.25
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    reference = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.allclose(translate(x, shift[:, 0] * 20, shift[:, 1] * 16), reference, atol=1e-4)
    # integer shifts move pixels exactly, with zeros coming in
    moved = translate(x, torch.tensor([3.0, 0, -2, 0]), torch.tensor([0.0, 1, 0, 0]))
    assert torch.equal(moved[0, :, :, :-3], x[0, :, :, 3:]) and moved[0, :, :, -3:].abs().sum() == 0
    assert torch.equal(moved[1, :, :-1], x[1, :, 1:]) and torch.equal(moved[3], x[3])
    # second order: for the linear T = translate, d/dx |d/dx sum((Tx)^2)|^2 = 8 (T^T T)^2 x
    def t(v):
        return translate(v, shift[:, 0] * 20, shift[:, 1] * 16)

    def t_adjoint(v):
        z = torch.zeros_like(x, requires_grad=True)
        return torch.autograd.grad(t(z), z, grad_outputs=v)[0]

    xi = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(t(xi).pow(2).sum(), xi, create_graph=True)
    grad.pow(2).sum().backward()
    expected = 8 * t_adjoint(t(t_adjoint(t(x))))
    assert expected.abs().sum() > 0
    torch.testing.assert_close(xi.grad, expected, rtol=1e-4, atol=1e-4)


def test_patch_wasserstein_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 20, 24, generator=g), torch.rand(2, 1, 20, 24, generator=g) ** 2
    size, stride = 6, 3
    got = patch_wasserstein(a, b, size, stride)
    assert got.shape == (2, 5, 7)
    for n, i, j in [(0, 0, 0), (1, 4, 6), (0, 2, 3), (1, 1, 5)]:
        pa = a[n, 0, i * stride:i * stride + size, j * stride:j * stride + size].flatten().numpy()
        pb = b[n, 0, i * stride:i * stride + size, j * stride:j * stride + size].flatten().numpy()
        assert float(got[n, i, j]) == pytest.approx(wasserstein_distance(pa, pb), rel=1e-5, abs=1e-7)
    mse = patch_mse(a, b, size, stride)
    assert float(mse[1, 4, 6]) == pytest.approx(float(((a - b)[1, 0, 12:18, 18:24] ** 2).mean()), rel=1e-5)


def test_patch_maps_average_overlaps():
    scores = torch.zeros(1, 5, 5)
    scores[0, 2, 2] = 1.0
    pixels = patches_to_pixels(scores, (12, 12), 4, 2)
    assert pixels.shape == (1, 1, 12, 12)
    assert float(pixels.max()) <= 1.0 and float(pixels[0, 0, 5, 5]) > 0 and float(pixels[0, 0, 0, 0]) == 0
    torch.testing.assert_close(patches_to_pixels(torch.full((1, 5, 5), 0.3), (12, 12), 4, 2),
                               torch.full((1, 1, 12, 12), 0.3))


def test_learning_rate_schedule():
    lrs = [ramped_lr(s, 100, 0.1, 0.05, 0.25) for s in range(100)]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.01
    assert lrs[4] < lrs[5] <= 0.1


def test_inversion_lowers_the_loss_and_scores_an_insert():
    torch.manual_seed(0)
    detector = StyleGAN2Detector(small_card()).eval()
    g = detector.generator
    with torch.no_grad():
        target = ((g(g.map(torch.randn(2, 16), truncation=0.7)) + 1) / 2).clamp(0, 1)
    record = []
    detector.invert(target, steps=30, record=record)
    assert record[-1] < 0.5 * record[0]
    region = torch.ones_like(target, dtype=torch.bool)
    with torch.inference_mode():
        out = detector.score(target, region)
    assert out.score.shape == target.shape and out.reconstruction.shape == target.shape
    assert out.slice_score.shape == (2,) and torch.all(out.score >= 0)
    region[:, :, :, :8] = False
    with torch.inference_mode():
        assert torch.all(detector.score(target, region).score[~region] == 0)


def test_gan_and_encoder_losses_train(tmp_path):
    """One run of each trainer on the shipped CT: every phase's loss is finite and the bundle detects."""
    from medanomaly.api import detect_volume
    from medanomaly.training import train
    from medanomaly.volumes import read_volume

    spec = {"size": 32, "spacing_mm": 14.0, "window_hu": [-1000.0, 500.0], "region": "body", "smoothing_mm": 14.0}
    gan = train("stylegan2", [str(DEMO_CT)], tmp_path / "gan", steps=34, batch_size=4, learning_rate=2e-3,
                checkpoint_every=17, input=spec, architecture=SMALL)
    losses = gan.card["training"]["losses"]
    assert gan.card["method"] == "stylegan2"
    assert all(np.isfinite(v) for row in losses for v in row.values())
    enc = train("stylegan2-encoder", [str(DEMO_CT)], tmp_path / "enc", steps=6, batch_size=4, learning_rate=1e-3,
                input=spec, architecture=gan.card["architecture"], init_from=gan.path, init_prefixes=("generator.",))
    assert enc.card["method"] == "stylegan2"
    torch.testing.assert_close(enc.tensors()["generator.const"], gan.tensors()["generator.const"])
    assert "training_pixel_mse" in enc.card["training"]["encoder"]
    result = detect_volume(read_volume(DEMO_CT), enc.path, device="cpu")
    assert result.reconstruction is not None and result.reconstruction.shape == result.heatmap.shape

    # explain with the user's labels: a label volume on the CT's grid marking a block of slices
    demo = sitk.ReadImage(str(DEMO_CT))
    labels = np.zeros(sitk.GetArrayViewFromImage(demo).shape, np.uint8)
    labels[20:40, 100:150, 100:150] = 1
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(demo)
    sitk.WriteImage(label_image, str(tmp_path / "labels.nrrd"))
    before = sha256_of(DEMO_CT)
    assert main(["explain", str(DEMO_CT), "-o", str(tmp_path / "explain"), "--model", str(enc.path),
                 "--labels", str(tmp_path / "labels.nrrd"), "--lambdas=-2,0,2", "--steps", "3"]) == 0
    summary = json.loads((tmp_path / "explain" / "explain.json").read_text())
    assert summary["slices_flagged"] == 20 and 0.0 <= summary["cv_auc"] <= 1.0
    assert (tmp_path / "explain" / "counterfactuals.png").stat().st_size > 0
    strip = sitk.ReadImage(str(tmp_path / "explain" / f"counterfactual_slice{summary['rendered_slices'][0]:03d}.nrrd"))
    assert strip.GetSize() == (32, 32, 3)
    assert sha256_of(DEMO_CT) == before  # the input is never modified
    assert main(["explain", str(DEMO_CT), "-o", str(tmp_path / "x"), "--model", "chest-ct-vqvae-recon"]) == 2
    assert not (tmp_path / "x").exists()


def test_direction_separates_two_latent_clusters():
    rng = np.random.default_rng(0)
    direction = np.zeros(16)
    direction[3] = 1.0
    a = rng.normal(size=(100, 16))  # about as many slices as one CT volume gives
    b = rng.normal(size=(100, 16)) + 2.0 * direction
    fitted = latent_direction(np.concatenate([a, b]), np.r_[np.zeros(100, bool), np.ones(100, bool)])
    assert fitted.cv_auc > 0.8
    assert abs(fitted.alpha @ direction) > 0.8  # it found the axis that separates them
    assert fitted.alpha @ direction > 0  # pointing towards the flagged group
    shuffled = latent_direction(rng.normal(size=(200, 16)), rng.random(200) < 0.5)
    assert shuffled.cv_auc < 0.75  # no structure, no separation
    with pytest.raises(InputError, match="at least 2"):
        latent_direction(a, np.r_[np.ones(1, bool), np.zeros(99, bool)])
