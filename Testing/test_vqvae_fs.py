"""The flagship's pieces: vectorized saliency equals the per-token loop, feature synthesis, residual weights, the
stage-2 regularizers (transformer dropout, augmentation strength), the map's probability power, and training and
detection on windows of the token grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.detectors.vqvae_fs import (EncoderLayer, TokenClassifier, VQVAEFeatureSynthesisDetector,
                                           residual_weight, synthesize, token_saliency)
from medanomaly.training.data import augment


def tiny_detector() -> VQVAEFeatureSynthesisDetector:
    """An untrained flagship on a 32x32 grid (seeded), small enough for unit tests."""
    torch.manual_seed(0)
    card = {"input": {"size": 32, "spacing_mm": 7.0, "window_hu": [-1000, 500]},
            "architecture": {"channels": [8, 8, 8], "num_embeddings": 16, "embedding_dim": 8, "classifier_width": 16,
                             "classifier_depth": 1, "classifier_heads": 2}}
    return VQVAEFeatureSynthesisDetector(card).eval()


def naive_saliency(x: np.ndarray, k: int = 8) -> np.ndarray:
    """The published recipe with a Python loop: PCA to k components, spectral entropy, remove each token in turn."""
    tokens = x.reshape(x.shape[0], -1).T  # [n, C]
    centred = tokens - tokens.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    y = centred @ vt[:k].T

    def entropy(samples):
        c = samples - samples.mean(0)
        lam = np.clip(np.linalg.eigvalsh(c.T @ c), 1e-12, None)
        p = lam / lam.sum()
        return -(p * np.log(p)).sum()

    full = entropy(y)
    change = np.array([abs(entropy(np.delete(y, t, axis=0)) - full) for t in range(len(y))])
    variance = tokens.var(axis=1, ddof=1)
    norm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
    return 0.5 * norm(change) + norm(variance)


def test_vectorized_saliency_matches_the_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 6, 6)).astype(np.float64)
    fast = token_saliency(torch.from_numpy(x)).numpy()
    for b in range(2):
        np.testing.assert_allclose(fast[b].ravel(), naive_saliency(x[b]), atol=1e-4)


def test_synthesis_corrupts_the_chosen_share_with_codebook_entries():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, 8, generator=g)
    codes = torch.randint(0, 64, (3, 16, 16), generator=g)
    quantized = codebook[codes].permute(0, 3, 1, 2)
    encodings = quantized + 0.01 * torch.randn(quantized.shape, generator=g)
    for salient in (True, False):
        out, mask = synthesize(encodings, quantized, codes, codebook, g, fraction=0.1, k=5, salient=salient)
        assert 0 < mask.sum(dim=(1, 2)).max() <= 26
        assert torch.equal(out[~mask[:, None].expand_as(out)], quantized[~mask[:, None].expand_as(quantized)])
        changed = out.permute(0, 2, 3, 1)[mask]  # every corrupted token holds a codebook vector
        assert (changed[:, None, :] == codebook[None]).all(-1).any(-1).all()
    _, blob = synthesize(encodings, quantized, codes, codebook, g, fraction=0.02, k=5, blob=True)
    _, single = synthesize(encodings, quantized, codes, codebook, torch.Generator().manual_seed(0), fraction=0.02, k=5)
    assert blob.sum() >= single.sum()


def test_residual_weight_is_low_where_the_decoder_repairs():
    residual = torch.zeros(1, 1, 64, 64)
    residual[..., 8:16, 8:16] = 1.0  # one token the decoder could not repair
    weight = residual_weight(residual, token_stride=8)
    assert weight.shape == (1, 8, 8) and float(weight.max()) == 1.0
    assert float(weight[0, 1, 1]) > float(weight[0, 6, 6]) == 0.0


def test_classifier_dropout_acts_in_training_only():
    torch.manual_seed(0)
    classifier = TokenClassifier(embedding_dim=8, width=16, depth=2, heads=2, tokens=16, dropout=0.3)
    x = torch.randn(2, 8, 4, 4)
    classifier.train()
    assert not torch.allclose(classifier(x), classifier(x))  # a different dropout mask on each pass
    classifier.eval()
    assert torch.equal(classifier(x), classifier(x))  # detection is deterministic
    plain = TokenClassifier(embedding_dim=8, width=16, depth=2, heads=2, tokens=16)
    plain.load_state_dict(classifier.state_dict())  # dropout adds no weights: bundles load either way
    assert torch.equal(plain.eval()(x), classifier(x))


def test_encoder_layer_computes_torchs_layer_with_the_same_weights():
    """The classifier's layer skips torch's inference fast path but is the same function of the same parameters:
    against nn.TransformerEncoderLayer (fast path at inference, the generic path in training) outputs and gradients
    agree to float rounding, at a real token count."""
    torch.manual_seed(0)
    ours = EncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    stock = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    stock.load_state_dict(ours.state_dict())  # same names: shipped bundles load unchanged
    x = torch.randn(3, 256, 32)
    with torch.inference_mode():
        assert torch.allclose(ours.eval()(x), stock.eval()(x), atol=1e-5)
    for layer in (ours, stock):
        layer.train().zero_grad()
        (layer(x) ** 2).mean().backward()
    assert torch.allclose(ours(x), stock(x), atol=1e-5)
    for (name, a), (_, b) in zip(ours.named_parameters(), stock.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_augmentation_strength_follows_the_settings():
    images = torch.zeros(4, 1, 32, 32)
    images[:, :, 12:20, 12:20] = 1.0
    still = augment(images, torch.Generator().manual_seed(0), max_rotation_deg=0.0, scale_range=0.0, max_shift=0.0)
    torch.testing.assert_close(still, images, atol=1e-5, rtol=0)  # the identity transform

    def moved(**strength):
        out = augment(images, torch.Generator().manual_seed(0), **strength)
        return float((out - images).abs().mean())

    assert 0 < moved(max_rotation_deg=7.0, scale_range=0.08, max_shift=0.05) < moved(
        max_rotation_deg=20.0, scale_range=0.2, max_shift=0.15)


def test_probability_power_sharpens_the_token_probability_in_the_map():
    detector = tiny_detector()
    image, region = torch.rand(2, 1, 32, 32), torch.ones(2, 1, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        plain = detector.score(image, region)
        residual = (image - plain.reconstruction).abs()
        detector.arch["use_residual"] = False
        probability = detector.score(image, region).score
        detector.arch.update(use_residual=True, probability_power=3.0)
        sharpened = detector.score(image, region).score
    torch.testing.assert_close(plain.score, probability * residual)
    torch.testing.assert_close(sharpened, probability ** 3 * residual)
    assert float(sharpened.sum()) < float(plain.score.sum())  # probabilities below 1 shrink


def test_grid_offsets_average_the_probability_of_token_grids_moved_by_part_of_a_token():
    detector = tiny_detector()
    image = torch.zeros(2, 1, 32, 32)
    image[:, :, 6:26, 6:26] = torch.rand(2, 1, 20, 20)  # air (0) at the borders: rolling the image is shifting it
    region = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        one = detector.score(image, region)
        detector.arch.update(use_residual=False)
        p0 = detector.score(image, region).score
        detector.arch.update(grid_offsets=2)
        p2 = detector.score(image, region).score
        detector.arch.update(use_residual=True)
        both = detector.score(image, region)
        # by hand: the classifier on the image rolled 4 pixels (half of a token of 8) down and right, rolled back
        rolled = detector.encode(torch.roll(image, (4, 4), (2, 3)))[1]
        p_rolled = torch.nn.functional.interpolate(detector.classifier(rolled).softmax(1)[:, 1:2], size=(32, 32),
                                                   mode="bilinear", align_corners=False)
        expected = (p0 + torch.roll(p_rolled, (-4, -4), (2, 3))) / 2
    inside = (slice(None), slice(None), slice(0, 28), slice(0, 28))  # the last 4 rows and columns are replicated
    torch.testing.assert_close(p2[inside], expected[inside])
    assert float((p2 - p0).abs().max()) > 1e-4  # the second grid sees other tokens
    # the residual factor and the pseudo-healthy image stay those of the unmoved grid
    torch.testing.assert_close(both.reconstruction, one.reconstruction)
    torch.testing.assert_close(both.score, p2 * (image - one.reconstruction).abs())


def test_engine_scores_one_slice_per_call_on_cpu_with_the_same_map():
    from medanomaly.engine import run_detector
    from medanomaly.preprocess import ModelGrid, ModelSlices

    detector = tiny_detector()
    hu = torch.rand(6, 32, 32) * 1500 - 1000
    region = np.ones((6, 32, 32), bool)
    slices = ModelSlices(hu=hu, region=region, body=region, spacing_mm=(5.0, 7.0, 7.0),
                         grid=ModelGrid(native_shape=(32, 32), resized_shape=(32, 32), offset=(0, 0), size=32))
    one, _, timings_one = run_detector(detector, slices, device=torch.device("cpu"))
    detector.cpu_batch_slices = None  # the memory budget alone: all 6 slices in one call
    six, _, timings_six = run_detector(detector, slices, device=torch.device("cpu"))
    assert (timings_one.batch_size, timings_one.batches, timings_six.batch_size) == (1, 6, 256)
    np.testing.assert_allclose(one, six, rtol=1e-4, atol=1e-6)
    assert one.max() > 0


def test_a_window_gets_its_own_part_of_the_positional_embeddings():
    torch.manual_seed(0)
    whole = TokenClassifier(embedding_dim=8, width=16, depth=1, heads=2, tokens=36).eval()  # a 6x6 token grid
    window = TokenClassifier(embedding_dim=8, width=16, depth=1, heads=2, tokens=16).eval()  # a 4x4 one
    state = dict(whole.state_dict())
    state["position"] = whole.position.detach().view(1, 6, 6, 16)[:, 1:5, 2:6].reshape(1, 16, 16)
    window.load_state_dict(state)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(whole(x, torch.tensor([[1, 2], [1, 2]])), window(x))
        other = whole(x, torch.tensor([[1, 2], [0, 0]]))  # per-window offsets within one batch
        assert torch.equal(other[0], whole(x[:1], torch.tensor([[1, 2]]))[0])
        assert not torch.allclose(other[1], other[0])
    with pytest.raises(AssertionError, match="leaves"):
        whole(x[:1], torch.tensor([[3, 0]]))  # rows 3-6 of a 6-row grid


def test_windowed_probability_blends_the_windows_that_cover_each_token():
    torch.manual_seed(0)
    classifier = TokenClassifier(embedding_dim=8, width=16, depth=1, heads=2, tokens=64).eval()  # 8x8 grid
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(classifier.probability(x, 8), classifier.probability(x, 0))  # one window: whole
        blended = classifier.probability(x, 4)[0, 0]
        # half overlap: windows start at tokens 0, 2 and 4 in each direction
        low, high = torch.full((8, 8), 2.0), torch.full((8, 8), -1.0)
        for top in (0, 2, 4):
            for left in (0, 2, 4):
                p = classifier(x[..., top:top + 4, left:left + 4], torch.tensor([[top, left]])).softmax(1)[0, 1]
                area = (slice(top, top + 4), slice(left, left + 4))
                low[area], high[area] = torch.minimum(low[area], p), torch.maximum(high[area], p)
                if top == left == 0:
                    corner = p[:2, :2]  # tokens that only this window covers
    assert (blended >= low - 1e-6).all() and (blended <= high + 1e-6).all()
    torch.testing.assert_close(blended[:2, :2], corner)
    assert not torch.allclose(blended, classifier.probability(x, 0)[0, 0])  # the windows see less context


def test_windowed_training_step_crops_both_stages_and_scores_whole_slices():
    from medanomaly.training import TrainConfig
    from medanomaly.training import vqvae_fs as trainer

    detector = tiny_detector()  # 32x32 slices, stride 8: a 4x4 token grid
    detector.arch.update(trainer.STAGE_DEFAULTS, train_window=2, stage1_fraction=0.5)
    detector.train()
    images, regions = torch.rand(3, 1, 32, 32), torch.ones(3, 1, 32, 32)
    config = TrainConfig(method="vqvae-fs", steps=2)
    seen, offsets = [], []

    def record(module, args, out):
        seen.append(tuple(args[0].shape))
        offsets.append(args[1])

    hook = detector.classifier.register_forward_hook(record)
    g = torch.Generator().manual_seed(0)
    for step in (0, 1):
        total, parts = trainer.loss(detector, images, regions, g, step=step, config=config)
        total.backward()
        assert torch.isfinite(total) and parts["stage"] == step + 1
    assert seen == [(3, 8, 2, 2)], "stage 2's classifier saw one 2x2-token window per slice"
    assert offsets[0].shape == (3, 2) and int(offsets[0].min()) >= 0 and int(offsets[0].max()) <= 2
    hook.remove()
    assert detector.classifier.position.grad is not None
    with torch.no_grad():
        out = detector.eval().score(images, regions.bool())
    assert out.score.shape == images.shape and out.reconstruction.shape == images.shape
