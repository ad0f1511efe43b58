"""VQ-VAE feature-space anomaly synthesis with a transformer token classifier (the flagship method).

Stage 1 learns normal CT with a VQ-VAE (MONAI `VQVAE`, stride 8: a 128^2 slice is a 16x16 token map). Stage 2 freezes
encoder and codebook, corrupts the most salient tokens with plausible codebook entries from elsewhere, and trains
(a) a transformer to label each token normal or corrupted and (b) a second decoder that rebuilds the normal image
from corrupted features. At test time the anomaly map is the upsampled token probability times the residual
|x - decoder2(quantized x)|; decoder2's output is the pseudo-healthy reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.inferers import sliding_window_inference
from monai.networks.nets import VQVAE
from torch import nn

from . import register
from .base import Detector, DetectorOutput
from .vqvae_recon import build_vqvae

DEFAULT_ARCHITECTURE = {
    "channels": [16, 32, 64],  # encoder widths; three stride-2 levels give stride 8
    "num_res_layers": 1,  # residual blocks per level
    "num_embeddings": 512,  # codebook entries
    "embedding_dim": 64,  # codebook vector length
    "commitment_cost": 0.25,  # weight of the encoder commitment loss
    "decay": 0.99,  # EMA decay of the codebook
    "classifier_width": 128,  # transformer width
    "classifier_depth": 4,  # transformer blocks
    "classifier_heads": 4,  # attention heads
    "classifier_dropout": 0.0,  # dropout in the transformer blocks while training (a regularizer; none at inference)
    "use_residual": True,  # map = probability x residual (True) or probability alone (False)
    "probability_power": 1.0,  # map = probability ** power x residual: above 1, only confident tokens keep their map
    # W > 0: training sees random W x W-token crops (stage 1 the crop's pixels, stage 2 its tokens, each crop with its
    # own positional embeddings): a stage-2 step then costs a fraction of a whole-grid one, which makes 256^2
    # trainable on a CPU. 0: whole slices
    "train_window": 0,
    # W > 0: at detection the classifier sees overlapping W x W-token windows, Gaussian-blended by MONAI's sliding
    # window inferer; 0: the whole grid at once (better in the lab even for a model trained on windows)
    "detection_window": 0,
    # N > 1: the token probability is the mean of N passes whose token grids are offset by k/N of a token (k = 0 ..
    # N - 1) along both axes, each pass's map shifted back onto the pixels (N times the network cost): a lesion
    # that straddles token borders is whole in one of the grids, and the passes' false alarms on normal anatomy
    # need not coincide. 1: one pass
    "grid_offsets": 1,
}

# ---------------------------------------------------------------------------------------------------------------
# Token classifier


class EncoderLayer(nn.TransformerEncoderLayer):
    """A pre-norm nn.TransformerEncoderLayer whose self-attention always goes through F.scaled_dot_product_attention.

    At inference the stock layer takes torch's fused fast path (torch._transformer_encoder_layer_fwd and
    torch._native_multi_head_attention), which on the CPU computes each head's whole 1024 x 1024 attention weights of
    a 256^2 slice; scaled_dot_product_attention tiles them (flash attention). The classifier then runs 1.11x faster
    on 2 CPU threads, 1.22x on one, and 1.26x when two 1-thread batch workers share the cores and their memory
    bandwidth (scripts/benchmark_classifier.py, scripts/results/benchmark_classifier.txt). The same parameters under
    the same names, so every shipped bundle loads unchanged, and the same function of them to float rounding
    (Testing/test_vqvae_fs.py). In training, and under CUDA autocast, the stock layer reaches the same kernel."""

    def forward(self, src: torch.Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        assert self.norm_first and src_mask is None and src_key_padding_mask is None, "pre-norm, no masks"
        x = src + self._sa_block(self.norm1(src))
        return x + self._ff_block(self.norm2(x))

    def _sa_block(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.self_attn
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=attention.num_heads)
                   for t in F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attention.dropout if self.training else 0.0)
        return self.dropout1(attention.out_proj(rearrange(x, "b h n d -> b n (h d)")))


class TokenClassifier(nn.Module):
    """A transformer over the token grid with learned positional embeddings; two logits per token."""

    def __init__(self, embedding_dim: int = 64,  # input feature length (codebook vectors)
                 width: int = 128,  # model width
                 depth: int = 4,  # transformer blocks
                 heads: int = 4,  # attention heads
                 tokens: int = 256,  # tokens per slice (16 x 16)
                 dropout: float = 0.0):  # in the transformer blocks, active in training mode only
        super().__init__()
        self.project = nn.Linear(embedding_dim, width)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = EncoderLayer(width, heads, 2 * width, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)

    def forward(self, quantized: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """quantized: [B, C, h, w] -> logits [B, 2, h, w].

        Without `offsets` the input is the whole (square) token grid. With `offsets` ([B, 2] integer top/left token
        of each window in that grid) it is a window of it, and each window gets its own part of the positional
        embeddings."""
        b, c, h, w = quantized.shape
        tokens = self.position.shape[1]
        if offsets is None:
            assert h * w == tokens, f"expected {tokens} tokens, got {h}x{w}"
            position = self.position
        else:
            side = int(round(tokens**0.5))
            offsets = torch.as_tensor(offsets, device=quantized.device).long().view(b, 2)
            assert int(offsets.min()) >= 0 and int((offsets + torch.tensor([h, w], device=offsets.device)).max()) \
                <= side, f"a {h}x{w} window at {offsets.tolist()} leaves the {side}x{side} token grid"
            rows = offsets[:, :1] + torch.arange(h, device=offsets.device)  # [B, h]
            cols = offsets[:, 1:] + torch.arange(w, device=offsets.device)  # [B, w]
            index = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)  # [B, h*w]
            position = self.position[0][index]
        x = self.project(rearrange(quantized, "b c h w -> b (h w) c")) + position
        x = self.head(self.norm(self.blocks(x)))
        return rearrange(x, "b (h w) k -> b k h w", h=h, w=w)

    def probability(self, quantized: torch.Tensor, window: int = 0) -> torch.Tensor:
        """P(corrupted) per token, [B, 1, h, w]: over the whole grid, or (window W > 0 smaller than the grid) over
        overlapping W x W windows (half overlap) blended with Gaussian weights by MONAI's sliding-window inferer."""
        side = quantized.shape[-1]
        if window <= 0 or window >= side:
            return self(quantized).float().softmax(1)[:, 1:2]

        def windows(patches: torch.Tensor, where: list) -> torch.Tensor:
            offsets = torch.tensor([[s[2].start, s[3].start] for s in where])
            return self(patches, offsets).float().softmax(1)[:, 1:2]

        return sliding_window_inference(quantized, (window, window), 64, windows, overlap=0.5, mode="gaussian",
                                        sigma_scale=0.25, with_coord=True).float()


# ---------------------------------------------------------------------------------------------------------------
# Saliency and feature synthesis


def token_saliency(encodings: torch.Tensor, components: int = 8) -> torch.Tensor:
    """0.5 * normalized leave-one-out change of spectral entropy + normalized per-token variance.

    encodings: [B, C, h, w] pre-quantization features. The entropy term projects the tokens of each slice on their
    top `components` principal components; removing token t changes the scatter matrix by a rank-one downdate, so
    all leave-one-out spectra come from one batched eigvalsh (no loop over tokens). Returns [B, h, w].
    """
    b, c, h, w = encodings.shape
    x = rearrange(encodings.float(), "b c h w -> b (h w) c")
    n = x.shape[1]
    variance = x.var(dim=2)
    centred = x - x.mean(dim=1, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    y = centred @ v[:, :components].transpose(1, 2)  # [B, n, k], zero mean
    scatter = y.transpose(1, 2) @ y  # [B, k, k]

    def entropy(eigenvalues: torch.Tensor) -> torch.Tensor:
        p = eigenvalues.clamp(min=1e-12)
        p = p / p.sum(-1, keepdim=True)
        return -(p * p.log()).sum(-1)

    full = entropy(torch.linalg.eigvalsh(scatter))
    # scatter without token t about the new mean: S - n/(n-1) y_t y_t^T
    outer = y[:, :, :, None] * y[:, :, None, :]
    loo = scatter[:, None] - (n / (n - 1)) * outer
    change = (entropy(torch.linalg.eigvalsh(loo)) - full[:, None]).abs()

    def normalize(t: torch.Tensor) -> torch.Tensor:
        lo, hi = t.amin(1, keepdim=True), t.amax(1, keepdim=True)
        return (t - lo) / (hi - lo).clamp(min=1e-12)

    return rearrange(0.5 * normalize(change) + normalize(variance), "b (h w) -> b h w", h=h, w=w)


def synthesize(encodings: torch.Tensor, quantized: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
               generator: torch.Generator, fraction: float = 0.1, k: int = 20, salient: bool = True,
               blob: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the top `fraction` most salient tokens (or random ones) with codes drawn from the pooled k nearest
    codebook entries of those tokens' features, shuffled across tokens.

    encodings, quantized: [B, C, h, w]; codes: [B, h, w] code indices; codebook: [K, C].
    Returns the corrupted quantized map and the mask of tokens whose code changed, [B, h, w] bool.
    """
    b, c, h, w = encodings.shape
    n = h * w
    m = max(1, int(round(fraction * n)))
    if salient:
        score = token_saliency(encodings).flatten(1)
    else:
        score = torch.rand(b, n, generator=generator).to(encodings.device)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=encodings.device)
    chosen.scatter_(1, score.topk(m, dim=1).indices, True)
    if blob:  # grow the chosen tokens into contiguous blobs, closer to lesion shapes
        grown = F.max_pool2d(chosen.view(b, 1, h, w).float(), 3, stride=1, padding=1) > 0
        chosen = grown.flatten(1)
    flat = rearrange(encodings, "b c h w -> b (h w) c")
    distances = torch.cdist(flat, codebook[None].expand(b, -1, -1))  # [B, n, K]
    neighbours = distances.topk(min(k, codebook.shape[0]), dim=2, largest=False).indices  # [B, n, k]
    new_codes = codes.flatten(1).clone()
    for i in range(b):  # per slice: pool the candidates of the chosen tokens, shuffle, assign
        tokens = chosen[i].nonzero().flatten()
        pool = neighbours[i, tokens].flatten()
        order = torch.randperm(pool.numel(), generator=generator).to(pool.device)
        new_codes[i, tokens] = pool[order[: tokens.numel()]]
    corrupted_mask = (new_codes != codes.flatten(1)).view(b, h, w)
    corrupted = rearrange(codebook[new_codes], "b (h w) c -> b c h w", h=h, w=w)
    # keep the original (straight-through) features where nothing changed
    out = torch.where(corrupted_mask[:, None], corrupted, quantized)
    return out, corrupted_mask


def residual_weight(residual: torch.Tensor, token_stride: int, window: int = 3) -> torch.Tensor:
    """Residual neighbourhood aggregation: pooled residual's local mean and variance, each normalized, summed and
    divided by the maximum; [B, 1, H, W] -> [B, h, w]. Corruptions the decoder repairs (low residual) weigh less."""
    pooled = F.avg_pool2d(residual, token_stride)
    mean = F.avg_pool2d(pooled, window, stride=1, padding=window // 2, count_include_pad=False)
    second = F.avg_pool2d(pooled**2, window, stride=1, padding=window // 2, count_include_pad=False)
    variance = (second - mean**2).clamp(min=0)

    def by_max(t: torch.Tensor) -> torch.Tensor:
        return t / t.flatten(1).amax(1).clamp(min=1e-12)[:, None, None, None]

    weight = by_max(by_max(mean) + by_max(variance))
    return weight[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Detector


@register
class VQVAEFeatureSynthesisDetector(Detector):
    """With the card's input.context_slices = c > 0 (2.5D) the VQ-VAE encodes the slice with c neighbours on each
    side as 2c + 1 channels and both decoders rebuild all of them, so the tokens must carry what the neighbours
    show; the map is the middle channel's."""

    method = "vqvae-fs"
    supports_context = True

    def __init__(self, card: dict):
        super().__init__(card)
        arch = {**DEFAULT_ARCHITECTURE, **card.get("architecture", {})}
        self.arch = arch
        channels = self.spec.channels
        self.middle = self.spec.context_slices  # index of the scored slice among the input channels
        self.vqvae: VQVAE = build_vqvae(arch, channels)
        self.decoder_corrupted = build_vqvae(arch, channels).decoder  # a second decoder, from corrupted features
        self.stride = 2 ** len(arch["channels"])
        tokens = (self.spec.size // self.stride) ** 2
        self.classifier = TokenClassifier(arch["embedding_dim"], arch["classifier_width"], arch["classifier_depth"],
                                          arch["classifier_heads"], tokens, float(arch["classifier_dropout"]))

    @property
    def codebook(self) -> torch.Tensor:
        return self.vqvae.quantizer.quantizer.embedding.weight

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-quantization features [B, C, h, w], quantized features and code indices [B, h, w] (no EMA update)."""
        quantizer = self.vqvae.quantizer.quantizer
        encodings = self.vqvae.encode(image)
        codes = quantizer.quantize(encodings)[2]
        return encodings, quantizer.embed(codes), codes

    def pixel_probability(self, quantized: torch.Tensor, size: tuple) -> torch.Tensor:
        """The classifier's P(corrupted) per token, bilinearly upsampled to the pixels, [B, 1, H, W]."""
        probability = self.classifier.probability(quantized, int(self.arch["detection_window"]))
        return F.interpolate(probability, size=size, mode="bilinear", align_corners=False)

    def score(self, image: torch.Tensor, region: torch.Tensor) -> DetectorOutput:
        channels = self.spec.channels
        assert image.ndim == 4 and image.shape[1] == channels, \
            f"expected [B, {channels}, H, W], got {tuple(image.shape)}"
        _, quantized, _ = self.encode(image)
        probability = self.pixel_probability(quantized, image.shape[-2:])
        passes = int(self.arch["grid_offsets"])
        if passes > 1:  # the shipped cards use 1: no extra pass over the map
            for k in range(1, passes):  # the image moved down and right by o pixels (air enters), the map back
                o = k * self.stride // passes
                moved = F.pad(image, (o, 0, o, 0))[..., :image.shape[-2], :image.shape[-1]]
                shifted = self.pixel_probability(self.encode(moved)[1], image.shape[-2:])
                probability = probability + F.pad(shifted[..., o:, o:], (0, o, 0, o), mode="replicate")
            probability = probability / passes
        middle = slice(self.middle, self.middle + 1)
        image = image[:, middle]
        reconstruction = self.decoder_corrupted(quantized)[:, middle].float().clamp(0, 1)
        power = float(self.arch["probability_power"])
        if power != 1.0:  # the shipped models use 1: no extra pass over the map
            probability = probability ** power
        score = probability * (image - reconstruction).abs() if self.arch["use_residual"] else probability
        return DetectorOutput(score=score * region, reconstruction=reconstruction)
