"""Non-learned baseline: each pixel's deviation from robust statistics of its tissue class on normal slices.

The tissue class comes from the context (a wide local mean of HU), the value from a narrow local mean; the score is
|value - median(class)| / MAD(class), with median and MAD measured on normal training slices. Every learned method
has to beat this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..preprocess import unwindow
from . import register
from .base import Detector, DetectorOutput

DEFAULT_ARCHITECTURE = {
    "context_mm": 35.0,  # width of the local mean that decides the tissue class
    "value_mm": 7.0,  # width of the local mean that is compared with the class statistics
    "class_edges_hu": [-1100, -900, -750, -600, -400, -200, -100, -50, 0, 50, 100, 200, 400, 700, 4000],
}


def mean_width(width_px: int) -> int:
    """The side of local_mean's square: `width_px` made odd (at least 1). It reaches width // 2 pixels each way."""
    return max(1, int(width_px) | 1)


def local_mean(image: torch.Tensor, width_px: int) -> torch.Tensor:
    """Mean over the square of `width_px` (made odd) around each pixel, of the pixels inside the image. Separably,
    along rows then columns: the same mean (the count of a rectangle is the product of its sides' counts), about 6x
    faster than one square pool at a width of 20."""
    width = mean_width(width_px)
    rows = F.avg_pool2d(image, (width, 1), stride=1, padding=(width // 2, 0), count_include_pad=False)
    return F.avg_pool2d(rows, (1, width), stride=1, padding=(0, width // 2), count_include_pad=False)


def tissue_classes(hu: torch.Tensor, context_px: int, edges: torch.Tensor) -> torch.Tensor:
    """The tissue class of every pixel: the bin of `edges` (HU) that the wide local mean of HU falls in."""
    return torch.bucketize(local_mean(hu, context_px), edges[1:-1].contiguous())


@register
class HUOutlierDetector(Detector):
    method = "hu-outlier"

    def __init__(self, card: dict):
        super().__init__(card)
        arch = {**DEFAULT_ARCHITECTURE, **card.get("architecture", {})}
        self.context_px = round(arch["context_mm"] / self.spec.spacing_mm)
        self.value_px = round(arch["value_mm"] / self.spec.spacing_mm)
        edges = torch.tensor(arch["class_edges_hu"], dtype=torch.float32)
        self.register_buffer("class_edges", edges)
        self.register_buffer("class_median", torch.zeros(len(edges) - 1))
        self.register_buffer("class_mad", torch.ones(len(edges) - 1))

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tissue class index and narrow local mean (HU) of every pixel."""
        hu = unwindow(image, self.spec.window_hu)
        return tissue_classes(hu, self.context_px, self.class_edges), local_mean(hu, self.value_px)

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        assert image.ndim == 4 and image.shape[1] == 1, f"expected [B, 1, H, W], got {tuple(image.shape)}"
        classes, value = self.features(image.float())
        z = (value - self.class_median[classes]).abs() / self.class_mad[classes]
        return DetectorOutput(score=z * region)
