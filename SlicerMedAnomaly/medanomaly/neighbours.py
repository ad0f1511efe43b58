"""Nearest-neighbour search over a memory of normal features, and the greedy coreset that bounds the memory.

faiss is used where it is installed (exact L2 search, `IndexFlatL2`); otherwise torch computes the distances in
chunks, so that memory stays bounded whatever the sizes of queries and memory.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines describe CPU features
try:  # optional: faster exact search on CPU
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None


def knn_distance(queries: torch.Tensor, memory: torch.Tensor, k: int = 1, *, chunk: int = 4096,
                 backend: str = "auto") -> torch.Tensor:
    """Mean Euclidean distance from each query [N, D] to its k nearest rows of memory [M, D] -> [N].

    backend: "auto" (faiss when installed and the tensors are on the CPU, else torch), "faiss" or "torch".
    """
    if queries.ndim != 2 or memory.ndim != 2 or queries.shape[1] != memory.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and memory {tuple(memory.shape)} must be [N, D] and [M, D]")
    k = int(min(max(1, k), memory.shape[0]))
    use_faiss = backend == "faiss" or (backend == "auto" and faiss is not None and queries.device.type == "cpu")
    if use_faiss:
        if faiss is None:
            raise RuntimeError("backend='faiss' but faiss is not installed (pip install faiss-cpu)")
        return _faiss_knn(queries, memory, k)
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    memory = memory.float()
    memory_sq = (memory * memory).sum(1)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].float()
        # |q - m|^2 = |q|^2 - 2 q.m + |m|^2 finds the neighbours fast; their distances are then recomputed
        # directly, which the expansion's rounding would spoil for near-duplicates
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ memory.T + memory_sq[None]
        index = torch.topk(d2, k, dim=1, largest=False).indices
        out[start:start + chunk] = (q[:, None] - memory[index]).norm(dim=2).mean(1)
    return out


def _faiss_knn(queries: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    index = faiss.IndexFlatL2(memory.shape[1])
    index.add(memory.detach().float().cpu().contiguous().numpy())
    d2, _ = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(d2).clamp_min(0.0).sqrt().mean(1).to(queries.device)


def greedy_coreset(features: torch.Tensor, size: int, *, seed: int = 0, projection_dim: int | None = 128,
                   chunk: int = 65536) -> tuple[torch.Tensor, float]:
    """Greedy k-center coreset (as in PatchCore): indices of `size` rows of features [N, D] chosen so that every row
    lies close to a chosen one, and the covering radius (the largest distance of any row to its nearest chosen row,
    measured in the projected space used for selection).

    With D > projection_dim the selection runs on a fixed random projection (Johnson-Lindenstrauss), as PatchCore
    does, which keeps it fast; the radius is then that of the projection.
    """
    n = features.shape[0]
    if size >= n:
        return torch.arange(n), 0.0
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5
        x = x @ projection.to(x.device)
    chosen = torch.empty(size, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    squared = (x * x).sum(1)
    nearest = torch.full((n,), float("inf"), device=x.device)  # squared distance to the nearest chosen row
    chosen[0] = first
    for i in range(size):
        c = x[chosen[i]]
        for start in range(0, n, chunk):  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix-vector product
            d2 = (squared[start:start + chunk] - 2.0 * (x[start:start + chunk] @ c) + squared[chosen[i]]).clamp_min(0)
            torch.minimum(nearest[start:start + chunk], d2, out=nearest[start:start + chunk])
        nearest[chosen[i]] = 0.0
        if i + 1 < size:
            chosen[i + 1] = int(torch.argmax(nearest))
    # the radius, recomputed directly for the farthest row (the expansion rounds near zero)
    far = int(torch.argmax(nearest))
    radius = float((x[chosen] - x[far]).norm(dim=1).min())
    return chosen, radius
