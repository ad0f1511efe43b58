"""The one interface every detection method implements; the volume engine only ever sees this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..bundle import ModelBundle
from ..errors import ModelError
from ..preprocess import InputSpec


@dataclass
class DetectorOutput:
    """Per-pixel raw anomaly scores (higher is more abnormal) and, if the method makes them, a pseudo-healthy
    reconstruction in the same [0, 1] window as the input and an image-level score per slice."""

    score: torch.Tensor  # [B, 1, H, W], >= 0
    reconstruction: torch.Tensor | None = None  # [B, 1, H, W] or None
    slice_score: torch.Tensor | None = None  # [B] or None (higher is more abnormal)


class Detector(nn.Module):
    """A slice-wise anomaly detector built from a model bundle.

    Subclasses set `method`, build their networks from `card["architecture"]` and implement `score`.
    """

    method: ClassVar[str] = ""
    # On a CPU, slices per network call at most: one slice's activations stay in the caches, which measured 10-20%
    # faster than batches of 10 for the 256^2 flagship (scripts/benchmark_pipeline.py). None: the memory budget alone
    # decides (for methods whose per-batch optimization should not change with the device).
    cpu_batch_slices: ClassVar[int | None] = 1
    # On CUDA, whether the networks run under float16 autocast (engine.network_precision).
    mixed_precision: ClassVar[bool] = True
    # Whether the method can take neighbouring slices as extra input channels (the card's input.context_slices).
    supports_context: ClassVar[bool] = False
    # Spacing along S (mm) of the slices and context slices the engine passes to `score`; it sets this before scoring
    # (methods that measure across slices need it); None: not told.
    slice_spacing_mm: float | None = None

    def __init__(self, card: dict):
        super().__init__()
        self.card = card
        self.spec = InputSpec.from_card(card["input"])
        if self.spec.context_slices and not self.supports_context:
            raise ModelError(f"method {self.method}: input.context_slices must be 0 (this method takes no "
                             f"neighbouring slices), got {self.spec.context_slices}")

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> "Detector":
        detector = cls(bundle.card)
        detector.load_state_dict(bundle.tensors(), strict=True)
        return detector.eval()

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        """image: [B, C, H, W] windowed to [0, 1], C = spec.channels (the slice, or with context slices the middle
        channel); region: [B, 1, H, W] bool, where scores count (of the middle slice)."""
        raise NotImplementedError
