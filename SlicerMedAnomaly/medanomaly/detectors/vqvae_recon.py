"""Reconstruction-error baseline: MONAI's VQVAE trained on normal slices; score = |x - reconstruction|."""

from __future__ import annotations

import torch
from monai.networks.nets import VQVAE

from . import register
from .base import Detector, DetectorOutput

DEFAULT_ARCHITECTURE = {
    "channels": [16, 32],  # encoder widths, one per stride-2 level
    "num_res_layers": 1,  # residual blocks per level
    "num_embeddings": 256,  # codebook entries
    "embedding_dim": 32,  # codebook vector length
    "commitment_cost": 0.25,  # weight of the encoder commitment loss
    "decay": 0.99,  # EMA decay of the codebook
}


def build_vqvae(architecture: dict, image_channels: int = 1) -> VQVAE:
    """MONAI's VQVAE for the architecture; `image_channels` in and out (a slice and its context slices)."""
    arch = {**DEFAULT_ARCHITECTURE, **architecture}
    levels = len(arch["channels"])
    return VQVAE(spatial_dims=2, in_channels=image_channels, out_channels=image_channels,
                 channels=tuple(arch["channels"]),
                 num_res_layers=arch["num_res_layers"], num_res_channels=tuple(arch["channels"]),
                 downsample_parameters=((2, 4, 1, 1),) * levels, upsample_parameters=((2, 4, 1, 1, 0),) * levels,
                 num_embeddings=arch["num_embeddings"], embedding_dim=arch["embedding_dim"],
                 commitment_cost=arch["commitment_cost"], decay=arch["decay"])


@register
class VQVAEReconstructionDetector(Detector):
    method = "vqvae-recon"

    def __init__(self, card: dict):
        super().__init__(card)
        self.vqvae = build_vqvae(card.get("architecture", {}))

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        assert image.ndim == 4 and image.shape[1] == 1, f"expected [B, 1, H, W], got {tuple(image.shape)}"
        reconstruction, _ = self.vqvae(image)
        reconstruction = reconstruction.clamp(0, 1)
        return DetectorOutput(score=(image - reconstruction).abs() * region, reconstruction=reconstruction)
