"""Keeping a VQ codebook alive: EMA codebooks collapse onto a few codes unless unused ones are restarted."""

from __future__ import annotations

import torch


@torch.no_grad()
def restart_dead_codes(ema_quantizer, encodings: torch.Tensor, generator: torch.Generator,
                       min_usage: float = 0.03) -> int:
    """Move codes whose EMA usage fell below `min_usage` onto random encoder outputs of the current batch.

    ema_quantizer: MONAI's EMAQuantizer (embedding, ema_w, ema_cluster_size); encodings: [B, C, H, W] encoder
    output. Returns the number of restarted codes.
    """
    dead = torch.nonzero(ema_quantizer.ema_cluster_size < min_usage).flatten()
    if dead.numel() == 0:
        return 0
    flat = encodings.permute(0, 2, 3, 1).reshape(-1, encodings.shape[1])
    pick = torch.randint(flat.shape[0], (dead.numel(),), generator=generator).to(flat.device)
    fresh = flat[pick] + 1e-3 * torch.randn(dead.numel(), flat.shape[1], generator=generator).to(flat.device)
    ema_quantizer.embedding.weight.data[dead] = fresh
    ema_quantizer.ema_w.data[dead] = fresh
    ema_quantizer.ema_cluster_size.data[dead] = 1.0
    return int(dead.numel())
