"""Deep kNN: distances from a slice's features to a memory of normal features (METHODS.md section 4).

A ResNet backbone (MONAI `ResNet`, 2D, one input channel) gives mid-level feature maps; the maps of the chosen
layers are brought to the resolution of the first, averaged over a 3x3 neighbourhood (as in PatchCore) and passed
through an adaptor (a per-patch MLP trained with SimSiam). Every patch feature is L2-normalised and carries its
in-plane position, so that normal tissue in the wrong place is far from the memory too.

- Patch map: mean distance of each patch to its k nearest normal patches, upsampled to pixels.
- Slice score: k-nearest-neighbour distance of the slice's pooled feature to the memory of normal slices.
- Test-time augmentation: both are geometric means over small in-plane shifts of the slice.
- Density normalization (`density_normalization`): each distance is divided by the typical distance that unseen
  normal features reach at its nearest memory rows (leave-out scales stored with the memory), so that sparse normal
  anatomy, which the memory covers less tightly, does not outrank what is foreign to every part of it.

The backbone is frozen at detection time. It is either pre-trained self-supervised on normal CT by the training
package, or a user's torchvision/timm ResNet weight file (see training.deep_knn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from ..bundle import ModelBundle
from ..neighbours import knn
from . import register
from .base import Detector, DetectorOutput

DEFAULT_ARCHITECTURE = {
    "layers": [1, 1, 1, 1],  # residual blocks per stage (resnet18: [2, 2, 2, 2])
    "block_inplanes": [32, 64, 128, 256],  # stage widths (resnet18: [64, 128, 256, 512])
    "feature_layers": [1, 2],  # stages whose maps make the patch features (stage 1 has stride 4)
    "patch_pool": 3,  # neighbourhood averaged into each patch feature
    "adaptor_dim": 128,  # width of the adaptor (SimSiam projector) output
    "predictor_dim": 64,  # bottleneck of the SimSiam predictor
    "position_weight": 0.5,  # scale of the in-plane position appended to each patch feature (0: none)
    "patch_features": "adaptor",  # memory space of patches: "adaptor" (SimSiam projector) or "backbone" (its input)
    "k": 3,  # neighbours for the patch distance
    "k_image": 3,  # neighbours for the slice score
    "tta_shifts": [[0, 0], [2, 2]],  # in-plane shifts (pixels) for test-time augmentation
    "density_normalization": False,  # divide distances by the leave-out scales of the nearest memory rows
    "density_exclusion_slices": 5,  # leave-out window (slices of the same volume) for those scales, in training
    "memory_patches": 0,  # rows in the patch memory (set by training)
    "memory_images": 0,  # rows in the slice memory (set by training)
    "backbone_source": "self-supervised",  # or the name of a user's weight file
}


def build_backbone(arch: dict) -> ResNet:
    """A MONAI ResNet whose parameter names match torchvision's (so torchvision/timm weights load)."""
    net = ResNet(block="basic", layers=list(arch["layers"]), block_inplanes=list(arch["block_inplanes"]),
                 spatial_dims=2, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, num_classes=1,
                 feed_forward=False, bias_downsample=False)
    for stage in range(max(arch["feature_layers"]) + 1, 5):  # stages past the last used one are never run
        setattr(net, f"layer{stage}", nn.Identity())
    return net


class Adaptor(nn.Module):
    """Per-patch projector (1x1 convolutions): backbone patch features -> the space the memory lives in."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                                 nn.Conv2d(in_channels=dim, out_channels=dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def predictor(dim: int, hidden: int) -> nn.Module:
    """SimSiam's predictor MLP (bottleneck)."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


@register
class DeepKNNDetector(Detector):
    method = "deep-knn"
    # float32 on CUDA too: with float16 autocast the maps' top 0.1% overlapped the CPU's less (Dice 0.968 against
    # 0.998) and scoring was slower (430 against 467 slices/s; H200, scripts/results/benchmark_gpu_deep_knn.json)
    mixed_precision = False

    def __init__(self, card: dict):
        super().__init__(card)
        self.arch = arch = {**DEFAULT_ARCHITECTURE, **card.get("architecture", {})}
        self.backbone = build_backbone(arch)
        widths = [arch["block_inplanes"][i - 1] for i in arch["feature_layers"]]
        self.stride = 4 * 2 ** (min(arch["feature_layers"]) - 1)
        self.adaptor = Adaptor(sum(widths), arch["adaptor_dim"])
        self.predictor = predictor(arch["adaptor_dim"], arch["predictor_dim"])
        extra = 2 if arch["position_weight"] > 0 else 0
        patch_dim = sum(widths) if arch["patch_features"] == "backbone" else arch["adaptor_dim"]
        self.register_buffer("memory_patches", torch.zeros(arch["memory_patches"], patch_dim + extra))
        self.register_buffer("memory_images", torch.zeros(arch["memory_images"], arch["adaptor_dim"]))
        if arch["density_normalization"]:
            self.register_buffer("memory_patch_scales", torch.ones(arch["memory_patches"]))
            self.register_buffer("memory_image_scales", torch.ones(arch["memory_images"]))

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> "DeepKNNDetector":
        tensors = bundle.tensors()
        card = dict(bundle.card, architecture={**bundle.card["architecture"],
                                               "memory_patches": int(tensors["memory_patches"].shape[0]),
                                               "memory_images": int(tensors["memory_images"].shape[0])})
        detector = cls(card)
        detector.load_state_dict(tensors, strict=True)
        return detector.eval()

    # -- features ------------------------------------------------------------------------------------------------

    def backbone_patches(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] -> concatenated, locally averaged feature maps of the chosen stages [B, C, H/s, W/s]."""
        net = self.backbone
        x = net.maxpool(net.act(net.bn1(net.conv1(image))))
        maps = []
        for stage in range(1, max(self.arch["feature_layers"]) + 1):
            x = getattr(net, f"layer{stage}")(x)
            if stage in self.arch["feature_layers"]:
                maps.append(x)
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        pool = int(self.arch["patch_pool"])
        return F.avg_pool2d(torch.cat(maps, 1), pool, stride=1, padding=pool // 2, count_include_pad=False)

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features [B, C, h, w] (the adaptor's output, or with patch_features="backbone" its input) and the
        adaptor output's global mean per slice [B, A] (the SimSiam projection)."""
        backbone = self.backbone_patches(image)
        z = self.adaptor(backbone)
        return (backbone if self.arch["patch_features"] == "backbone" else z), z.mean(dim=(2, 3))

    def positions(self, h: int, w: int, shift: tuple[int, int], device) -> torch.Tensor:
        """In-plane position of each patch centre in the unshifted slice, in [-1, 1], times the position weight."""
        size_y, size_x = h * self.stride, w * self.stride
        y = ((torch.arange(h, device=device) + 0.5) * self.stride - shift[0]) / size_y * 2 - 1
        x = ((torch.arange(w, device=device) + 0.5) * self.stride - shift[1]) / size_x * 2 - 1
        grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), 0)  # [2, h, w]
        return grid * float(self.arch["position_weight"])

    def features(self, image: torch.Tensor, shift: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory-space features of a (shifted) slice: patches [B, h, w, D] and slice [B, A], L2-normalised."""
        shifted = torch.roll(image, shifts=tuple(shift), dims=(2, 3)) if any(shift) else image
        patches, pooled = self.embed(shifted)
        patches = F.normalize(patches.float(), dim=1)
        if self.arch["position_weight"] > 0:
            b, _, h, w = patches.shape
            position = self.positions(h, w, shift, patches.device)[None].expand(b, -1, -1, -1)
            patches = torch.cat([patches, position], 1)
        return patches.permute(0, 2, 3, 1), F.normalize(pooled.float(), dim=1)

    def patch_region(self, region: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
        """Patches that touch the region, on the patch grid of the shifted slice: [B, h, w] bool."""
        shifted = torch.roll(region.float(), shifts=tuple(shift), dims=(2, 3)) if any(shift) else region.float()
        return F.max_pool2d(shifted, self.stride, self.stride)[:, 0] > 0

    # -- scoring -------------------------------------------------------------------------------------------------

    def distance(self, queries: torch.Tensor, kind: str) -> torch.Tensor:
        """Mean distance of each query [N, D] to its k nearest rows of the patch or image memory; with density
        normalization, divided by the mean leave-out scale of those rows."""
        memory = self.memory_patches if kind == "patch" else self.memory_images
        k = self.arch["k"] if kind == "patch" else self.arch["k_image"]
        d, index = knn(queries, memory, k)
        if not self.arch["density_normalization"]:
            return d.mean(1)
        scales = self.memory_patch_scales if kind == "patch" else self.memory_image_scales
        return d.mean(1) / scales[index].mean(1).clamp_min(1e-6)

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        assert image.ndim == 4 and image.shape[1] == 1, f"expected [B, 1, H, W], got {tuple(image.shape)}"
        if self.memory_patches.shape[0] == 0:
            raise RuntimeError("this deep-kNN model has an empty memory; it was not trained")
        image = image.float()
        log_maps, log_slices = [], []
        for shift in self.arch["tta_shifts"]:
            shift = (int(shift[0]), int(shift[1]))
            patches, pooled = self.features(image, shift)
            keep = self.patch_region(region, shift)
            distances = torch.zeros(keep.shape, device=image.device)
            if keep.any():
                distances[keep] = self.distance(patches[keep], "patch")
            pixel = F.interpolate(distances[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False)
            if any(shift):
                pixel = torch.roll(pixel, shifts=(-shift[0], -shift[1]), dims=(2, 3))
            log_maps.append(torch.log(pixel.clamp_min(1e-6)))
            log_slices.append(torch.log(self.distance(pooled, "image").clamp_min(1e-6)))
        score = torch.exp(torch.stack(log_maps).mean(0)) * region
        slice_score = torch.exp(torch.stack(log_slices).mean(0))
        return DetectorOutput(score=score, slice_score=slice_score)
