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
    return knn(queries, memory, k, chunk=chunk, backend=backend)[0].mean(1)


def knn(queries: torch.Tensor, memory: torch.Tensor, k: int = 1, *, chunk: int = 4096, backend: str = "auto",
        query_origins: torch.Tensor | None = None, memory_origins: torch.Tensor | None = None,
        exclude_within: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of memory [M, D] for each query [N, D]: Euclidean distances [N, k] (ascending) and the
    rows' indices [N, k]. k is capped at the memory's size.

    With origins ([N, 2] and [M, 2]: volume and slice index of each feature), rows from the query's own volume within
    `exclude_within` slices of its slice are not neighbours: a leave-out search, where a training feature finds the
    neighbours an unseen slice of that anatomy would find. A query whose every row is excluded gets distance inf.
    backend: "auto" (faiss when installed, the tensors are on the CPU and nothing is excluded, else torch), "faiss"
    or "torch".
    """
    if queries.ndim != 2 or memory.ndim != 2 or queries.shape[1] != memory.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and memory {tuple(memory.shape)} must be [N, D] and [M, D]")
    k = int(min(max(1, k), memory.shape[0]))
    excluding = query_origins is not None and memory_origins is not None
    use_faiss = backend == "faiss" or (backend == "auto" and faiss is not None and queries.device.type == "cpu"
                                       and not excluding)
    if use_faiss:
        if faiss is None:
            raise RuntimeError("backend='faiss' but faiss is not installed (pip install faiss-cpu)")
        if excluding:
            raise ValueError("the faiss backend cannot exclude neighbours by origin; use backend='torch'")
        return _faiss_knn(queries, memory, k)
    distances = torch.empty(queries.shape[0], k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    memory = memory.float()
    memory_sq = (memory * memory).sum(1)
    if excluding:
        memory_origins = memory_origins.to(memory.device)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].float()
        # |q - m|^2 = |q|^2 - 2 q.m + |m|^2 finds the neighbours fast; their distances are then recomputed
        # directly, which the expansion's rounding would spoil for near-duplicates
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ memory.T + memory_sq[None]
        if excluding:
            qo, mo = query_origins[start:start + chunk].to(q.device), memory_origins
            near = (qo[:, None, 0] == mo[None, :, 0]) & ((qo[:, None, 1] - mo[None, :, 1]).abs() <= exclude_within)
            d2.masked_fill_(near, float("inf"))
        index = torch.topk(d2, k, dim=1, largest=False).indices
        d = (q[:, None] - memory[index]).norm(dim=2)
        if excluding:
            d = d.masked_fill(torch.gather(d2, 1, index).isinf(), float("inf"))
        d, order = torch.sort(d, dim=1)
        distances[start:start + chunk] = d
        indices[start:start + chunk] = torch.gather(index, 1, order)
    return distances, indices


def leave_out_scales(candidates: torch.Tensor, origins: torch.Tensor, chosen: torch.Tensor, k: int,
                     exclude_within: int, *, chunk: int = 4096) -> torch.Tensor:
    """The typical distance from unseen normal features to each row of a memory: [M].

    `candidates` [N, D] are all normal features, `origins` [N, 2] their volume and slice, and the memory is
    candidates[chosen]. Every candidate searches the memory without the rows from its own volume within
    `exclude_within` slices (as an unseen slice would), and each memory row's scale is the mean k-NN distance of the
    candidates whose nearest row it is (its own leave-out distance when none is). Dividing a query's k-NN distance by
    the scale of its neighbours then measures it against what normal tissue of that kind usually reaches: about 1
    for normal features wherever the memory is sparse or dense, more for what the memory does not hold.
    """
    chosen = chosen.to(candidates.device)
    d, index = knn(candidates, candidates[chosen], k, chunk=chunk, backend="torch", query_origins=origins,
                   memory_origins=origins[chosen], exclude_within=exclude_within)
    distance = d.mean(1)
    finite = torch.isfinite(distance)
    if not finite.any():
        raise ValueError(f"every normal feature lies within {exclude_within} slices of all the memory's rows; "
                         "train on more slices or lower the exclusion")
    nearest = index[finite, 0]
    size = chosen.shape[0]
    sums = torch.zeros(size, device=candidates.device).index_add_(0, nearest, distance[finite])
    counts = torch.bincount(nearest, minlength=size).float()
    own = distance[chosen]
    own = torch.where(torch.isfinite(own), own, distance[finite].median())
    return torch.where(counts > 0, sums / counts.clamp_min(1), own)


def _faiss_knn(queries: torch.Tensor, memory: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = faiss.IndexFlatL2(memory.shape[1])
    index.add(memory.detach().float().cpu().contiguous().numpy())
    d2, found = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    return (torch.from_numpy(d2).clamp_min(0.0).sqrt().to(queries.device),
            torch.from_numpy(found).long().to(queries.device))


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
