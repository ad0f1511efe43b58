"""Deep kNN: nearest-neighbour distances against brute force, the coreset's covering radius, SimSiam learning, user
backbone weights, and the whole train -> bundle -> detect path on the shipped real CT."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import DEFAULT_MODEL, DEMO_CT
from medanomaly.errors import InputError
from medanomaly.neighbours import greedy_coreset, knn, knn_distance, leave_out_scales


def brute_knn(queries, memory, k):
    d = torch.cdist(queries.double(), memory.double())
    return torch.sort(d, dim=1).values[:, :k].mean(1)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    queries, memory = torch.randn(503, 33, generator=g), torch.randn(211, 33, generator=g)
    got = knn_distance(queries, memory, k, chunk=64, backend="torch")
    torch.testing.assert_close(got.double(), brute_knn(queries, memory, k), rtol=1e-4, atol=1e-4)


def test_knn_exact_match_is_zero_and_k_is_capped():
    memory = torch.randn(5, 8)
    assert torch.allclose(knn_distance(memory, memory, 1, backend="torch"), torch.zeros(5), atol=1e-3)
    # k larger than the memory: the mean over all rows
    q = torch.randn(3, 8)
    torch.testing.assert_close(knn_distance(q, memory, 50, backend="torch").double(), brute_knn(q, memory, 5),
                               rtol=1e-4, atol=1e-4)


def test_knn_faiss_agrees_with_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    queries, memory = torch.randn(300, 16, generator=g), torch.randn(400, 16, generator=g)
    torch.testing.assert_close(knn_distance(queries, memory, 3, backend="faiss"),
                               knn_distance(queries, memory, 3, backend="torch"), rtol=1e-3, atol=1e-3)


def test_coreset_covering_radius_is_exact_and_shrinks():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(300, 6, generator=g), torch.randn(40, 6, generator=g) * 0.2 + 6])
    radii = []
    for size in (5, 20, 80):
        chosen, radius = greedy_coreset(points, size, seed=0, projection_dim=None)
        assert len(set(chosen.tolist())) == size
        nearest = torch.cdist(points, points[chosen]).min(1).values
        assert radius == pytest.approx(float(nearest.max()), rel=1e-5)  # every point lies within the radius
        radii.append(radius)
    assert radii[0] > radii[1] > radii[2]
    # the far cluster is covered by a chosen point: greedy k-center reaches outliers first
    assert (points[greedy_coreset(points, 5, seed=0, projection_dim=None)[0]][:, 0] > 3).any()
    # greedy k-center is a 2-approximation: no other set of the same size has a radius below half of it
    random_radius = torch.cdist(points, points[torch.randperm(340, generator=g)[:20]]).min(1).values.max()
    assert radii[1] <= 2 * float(random_radius)
    chosen, radius = greedy_coreset(points, 1000)
    assert len(chosen) == len(points) and radius == 0.0


def tiny_card(**arch):
    from medanomaly.preprocess import InputSpec
    from medanomaly.training.deep_knn import architecture

    return {"name": "tiny", "version": "0", "method": "deep-knn",
            "input": {**InputSpec().to_card(), "size": 64},
            "architecture": architecture({"layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64],
                                          "feature_layers": [1, 2],
                                          "adaptor_dim": 16, "predictor_dim": 8, **arch})}


def synthetic_slices(n, seed):
    """Ellipses of soft tissue with darker 'lungs': a stand-in for normal slices."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    images, bodies = [], []
    for _ in range(n):
        a, b = 0.7 + 0.2 * torch.rand(1, generator=g), 0.5 + 0.2 * torch.rand(1, generator=g)
        body = (xx / a) ** 2 + (yy / b) ** 2 < 1
        lungs = (((xx.abs() - 0.35) / 0.22) ** 2 + (yy / 0.35) ** 2) < 1
        img = 0.1 + 0.5 * body - 0.4 * (body & lungs) + 0.02 * torch.randn(64, 64, generator=g)
        images.append(img.clamp(0, 1))
        bodies.append(body)
    return torch.stack(images)[:, None], torch.stack(bodies)[:, None]  # the body region includes the lungs


def test_simsiam_loss_decreases_on_a_tiny_set():
    from medanomaly.detectors.deep_knn import DeepKNNDetector
    from medanomaly.training import deep_knn as trainer

    torch.manual_seed(0)
    detector = DeepKNNDetector(tiny_card())
    model = trainer.trainable(detector).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, regions = synthetic_slices(16, 0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss, parts = trainer.loss(model, images, regions, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert -1.0 <= min(losses) and max(losses) <= 1.0  # a negative cosine similarity
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1


class Slices:  # the fields finalize reads from a training buffer
    def __init__(self, images, regions):
        self.images, self.regions = images, regions
        self.origins = torch.stack([torch.zeros(len(images), dtype=torch.long), torch.arange(len(images))], 1)

    def __len__(self):
        return len(self.images)


@pytest.mark.parametrize("patch_features,density", [("adaptor", False), ("backbone", False), ("adaptor", True)])
def test_detector_scores_a_foreign_blob_above_normal_tissue(patch_features, density):
    """Untrained networks, so only a clear margin for the adaptor's features (the shipped default); with the raw
    backbone features the memory lives in the backbone's space and the blob still scores higher. With density
    normalization the distances are divided by leave-out scales and the blob still stands out."""
    from medanomaly.detectors.deep_knn import DeepKNNDetector
    from medanomaly.training import TrainConfig, deep_knn as trainer

    torch.manual_seed(0)
    detector = DeepKNNDetector(tiny_card(memory_max_patches=500, patch_features=patch_features,
                                         density_normalization=density, density_exclusion_slices=1))
    images, regions = synthetic_slices(12, 1)
    report = trainer.finalize(detector, Slices(images, regions), TrainConfig(seed=0))
    assert report["architecture"]["memory_patches"] == 500
    width = 16 if patch_features == "adaptor" else 8 + 16  # adaptor_dim, or stage 1 + stage 2 widths
    assert detector.memory_patches.shape == (500, width + 2)  # + the in-plane position
    assert detector.memory_images.shape == (12 * len(detector.arch["tta_shifts"]), 16)
    test, region = synthetic_slices(1, 2)
    test, region = test.repeat(2, 1, 1, 1), region.repeat(2, 1, 1, 1)
    test[1, 0, 28:36, 10:18] = 1.0  # a bright foreign body in the left lung of the same slice
    with torch.inference_mode():
        out = detector.eval().score(test, region)
    assert out.score.shape == test.shape and out.slice_score.shape == (2,)
    assert torch.all(out.score[~region] == 0) and torch.all(out.score >= 0)
    blob = out.score[1, 0, 28:36, 10:18].mean()
    margin = 1.5 if patch_features == "adaptor" else 1.0
    assert blob > margin * out.score[0, 0, 28:36, 10:18].mean()  # the same place without the blob
    assert out.slice_score[1] > out.slice_score[0]
    if density:  # normal tissue of a new slice sits near its leave-out scale: ratios about 1
        assert set(report["memory"]["density_scales"]) == {"patch", "image"}
        normal = out.score[0, 0][region[0, 0]]
        assert 0.5 < float(normal.median()) < 2.0


def test_detector_scores_a_batch_as_it_scores_each_slice():
    """A batch of slices (as a GPU gets them) scores each slice as it scores alone (as a CPU gets them), and a
    slice whose region is empty scores zero."""
    from medanomaly.detectors.deep_knn import DeepKNNDetector
    from medanomaly.training import TrainConfig, deep_knn as trainer

    torch.manual_seed(0)
    detector = DeepKNNDetector(tiny_card(memory_max_patches=500, density_normalization=True,
                                         density_exclusion_slices=1))
    trainer.finalize(detector, Slices(*synthetic_slices(12, 1)), TrainConfig(seed=0))
    test, region = synthetic_slices(3, 2)
    region[2] = False
    with torch.inference_mode():
        together = detector.eval().score(test, region)
        alone = [detector.score(test[i:i + 1], region[i:i + 1]) for i in range(3)]
    assert torch.allclose(together.score, torch.cat([a.score for a in alone]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(together.slice_score, torch.cat([a.slice_score for a in alone]), rtol=1e-5)
    assert together.score[:2].amax() > 0 and torch.all(together.score[2] == 0)


def test_knn_leave_out_excludes_nearby_slices_of_the_same_volume():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(60, 5, generator=g)
    origins = torch.stack([torch.arange(60) // 30, torch.arange(60) % 30], 1)  # two volumes of 30 slices
    d, idx = knn(feats, feats, 4, query_origins=origins, memory_origins=origins, exclude_within=2, backend="torch")
    full = torch.cdist(feats.double(), feats.double())
    allowed = (origins[:, None, 0] != origins[None, :, 0]) | ((origins[:, None, 1] - origins[None, :, 1]).abs() > 2)
    expected = torch.sort(full.masked_fill(~allowed, float("inf")), dim=1)
    torch.testing.assert_close(d.double(), expected.values[:, :4], rtol=1e-4, atol=1e-4)
    assert torch.all(allowed[torch.arange(60)[:, None], idx])  # no neighbour inside the window
    # a single slice of a single volume: nothing is left to compare with
    d, _ = knn(feats[:3], feats[:3], 1, query_origins=torch.zeros(3, 2, dtype=torch.long),
               memory_origins=torch.zeros(3, 2, dtype=torch.long), exclude_within=0, backend="torch")
    assert torch.isinf(d).all()


def test_leave_out_scales_follow_the_local_spread_of_normal_features():
    """A tight cluster and a loose one: unseen members of the loose cluster lie farther from the memory, and its rows
    get the larger scales, so a query's ratio to them is comparable across both clusters."""
    g = torch.Generator().manual_seed(4)
    tight = torch.randn(200, 3, generator=g) * 0.05
    loose = torch.randn(200, 3, generator=g) * 0.5 + 5
    feats = torch.cat([tight, loose])
    origins = torch.stack([torch.zeros(400, dtype=torch.long), torch.arange(400) % 100], 1)  # 100 slices
    chosen = torch.arange(0, 400, 4)
    scales = leave_out_scales(feats, origins, chosen, 3, exclude_within=1)
    assert scales.shape == (100,) and torch.all(scales > 0)
    assert float(scales[chosen >= 200].median()) > 4 * float(scales[chosen < 200].median())
    # the scale of a row is the mean leave-out distance of the candidates whose nearest row it is
    d, idx = knn(feats, feats[chosen], 3, query_origins=origins, memory_origins=origins[chosen], exclude_within=1,
                 backend="torch")
    row = int(idx[0, 0])
    mine = idx[:, 0] == row
    assert float(scales[row]) == pytest.approx(float(d.mean(1)[mine].mean()), rel=1e-5)


def test_user_backbone_weights(tmp_path):
    """A torchvision-named ResNet state dict (RGB first convolution) loads, is summed to one channel and frozen;
    files that do not fit, or are not weights-only, are refused with a clear message."""
    from monai.networks.nets import ResNet

    from medanomaly.detectors.deep_knn import DeepKNNDetector
    from medanomaly.training import deep_knn as trainer

    rgb = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=2,
                 n_input_channels=3, num_classes=10, bias_downsample=False, conv1_t_size=7, conv1_t_stride=2)
    state = {k: v.clone() for k, v in rgb.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "r.safetensors"))
    torch.save(state, tmp_path / "r.pth")
    for name in ("r.safetensors", "r.pth"):
        detector = DeepKNNDetector(tiny_card(backbone_weights=str(tmp_path / name)))
        trainer.trainable(detector)
        torch.testing.assert_close(detector.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
        torch.testing.assert_close(detector.backbone.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
        assert not any(p.requires_grad for p in detector.backbone.parameters())
        assert all(p.requires_grad for p in detector.adaptor.parameters())
    with pytest.raises(InputError, match="shape"):
        trainer.trainable(DeepKNNDetector(tiny_card(block_inplanes=[16, 32, 64, 128],
                                                    backbone_weights=str(tmp_path / "r.safetensors"))))

    torch.save({"conv1.weight": datetime.date(2020, 1, 1)}, tmp_path / "evil.pth")  # an object weights-only refuses
    with pytest.raises(InputError, match="weights-only"):
        trainer.read_backbone_weights(tmp_path / "evil.pth")


def test_train_bundle_detect_end_to_end(tmp_path):
    """Train a few steps on the shipped real CT, write the bundle, load it back by its card and detect."""
    from medanomaly.api import detect_volume
    from medanomaly.bundle import ModelBundle
    from medanomaly.training import train
    from medanomaly.volumes import read_volume

    bundle = train("deep-knn", [str(DEMO_CT)], tmp_path / "knn", steps=4, batch_size=4, checkpoint_every=2,
                   input={"size": 64, "spacing_mm": 7.0, "window_hu": [-1000.0, 500.0], "region": "body",
                          "smoothing_mm": 6.0},
                   architecture={"block_inplanes": [8, 16, 32, 64], "adaptor_dim": 16,
                                 "predictor_dim": 8, "memory_max_patches": 300})
    card = ModelBundle.load(bundle.path).card
    assert card["architecture"]["memory_patches"] == 300
    assert card["training"]["memory"]["patch_candidates"] > 300
    assert len(card["calibration"]["slice_quantiles"]) == len(card["calibration"]["voxel_levels"])
    volume = read_volume(DEMO_CT)
    result = detect_volume(volume, bundle.path, device="cpu")
    assert result.heatmap.shape == volume.hu.shape
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
    assert 0.0 <= result.volume_score <= 1.0

    # --init-from another deep-kNN bundle takes its networks (not the vqvae-fs stage-1 names) and rebuilds the
    # memory, here with density normalization; a bundle of another method is refused instead of silently ignored
    rebuilt = train("deep-knn", [str(DEMO_CT)], tmp_path / "knn-density", steps=0, batch_size=4,
                    init_from=bundle.path, input=card["input"],
                    architecture={"block_inplanes": [8, 16, 32, 64], "adaptor_dim": 16, "predictor_dim": 8,
                                  "memory_max_patches": 300, "density_normalization": True,
                                  "density_exclusion_slices": 2})
    before, after = ModelBundle.load(bundle.path).tensors(), ModelBundle.load(rebuilt.path).tensors()
    networks = [k for k in before if k.startswith(("backbone.", "adaptor.", "predictor."))]
    assert networks and all(torch.equal(before[k], after[k]) for k in networks)
    scales = after["memory_patch_scales"]
    assert scales.shape == (300,) and torch.all(scales > 0)
    assert after["memory_image_scales"].shape == after["memory_images"].shape[:1]
    assert ModelBundle.load(rebuilt.path).card["training_init"]["prefixes"] == ["backbone.", "adaptor.", "predictor."]
    result = detect_volume(volume, rebuilt.path, device="cpu")
    assert result.heatmap.shape == volume.hu.shape and 0.0 <= result.volume_score <= 1.0
    with pytest.raises(InputError, match="holds no deep-knn weights"):
        train("deep-knn", [str(DEMO_CT)], tmp_path / "wrong", steps=0, init_from=DEFAULT_MODEL,
              input=card["input"], architecture={"block_inplanes": [8, 16, 32, 64], "adaptor_dim": 16,
                                                 "predictor_dim": 8})
    assert not (tmp_path / "wrong").exists()
