"""HistoPrism: cancer-type-conditioned transformer over all spots of a slide -> expression of every gene.

Reads top to bottom: conditioning -> projection (+ optional neighbourhood and position) -> encoder
-> head. Pure torch: no file I/O, no AnnData. Shapes: B slides (1 in training), N spots, D embedding
dim, H hidden width, G genes, T context tokens per condition, K neighbours per spot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    in_dim: int = 1024  # patch-embedding dimension of the encoder (UNI: 1024)
    n_genes: int = 38982  # output genes: the panel size
    n_conditions: int = 29  # cancer-type vocabulary, including "Unknown"
    hidden: int = 256  # transformer width
    n_layers: int = 2  # transformer encoder layers
    n_heads: int = 8  # self-attention heads
    cross_heads: int = 4  # cross-attention heads of the conditioning block
    ff_mult: int = 4  # feed-forward width = ff_mult * hidden
    dropout: float = 0.1  # dropout on residual branches, feed-forward and head
    attn_dropout: float = 0.1  # dropout on attention weights (0 lets CPU/GPU use fused kernels)
    conditioning: bool = True  # False: the no-conditioning ablation
    context_tokens: int = 1  # tokens per condition; 1 reduces to a learned per-cancer shift
    positional_encoding: bool = (
        False  # sinusoidal encoding of spot centres (µm), added after projection
    )
    pe_scale_um: float = 10000.0  # longest wavelength of the positional encoding, µm
    neighbours: int = (
        0  # K > 0: add the mean embedding of each spot's K nearest spots (spatial context)
    )
    standardize_inputs: bool = (
        False  # z-score embeddings with training-set statistics (stored buffers)
    )

    def to_dict(self) -> dict:
        return asdict(self)


class CancerConditioning(nn.Module):
    """Cross-attention from patch features (queries) to the cancer type's context tokens (keys/values),
    then Add & LayerNorm, as in the paper."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.n_heads, self.t = cfg.in_dim, cfg.cross_heads, cfg.context_tokens
        self.tokens = nn.Embedding(cfg.n_conditions * cfg.context_tokens, d)
        # one token needs no query projection (see _single_token): DDP wants no unused weights
        self.q = nn.Linear(d, d) if cfg.context_tokens > 1 else None
        self.kv, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        ids = condition[:, None] * self.t + torch.arange(self.t, device=x.device)  # (B, T)
        ctx = self.tokens(ids)  # (B, T, D)
        p = self.dropout if self.training else 0.0
        if self.t == 1:
            a = self._single_token(ctx, N, p)  # (B, N, D)
        else:
            q = self.q(x).view(B, N, self.n_heads, -1).transpose(1, 2)  # (B, h, N, D/h)
            kv = self.kv(ctx).view(B, self.t, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=p)  # (B, h, N, D/h)
            a = a.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.norm(x + F.dropout(self.out(a), p, self.training))

    def _single_token(self, ctx: torch.Tensor, N: int, p: float) -> torch.Tensor:
        """Softmax over one key is 1, so every query receives the value whatever the query is:
        the same result as the general path without the (N, D) x (D, D) query projection."""
        B, _, D = ctx.shape
        v = self.kv(ctx)[..., D:]  # (B, 1, D)
        a = v.expand(B, N, D)  # (B, N, D)
        if p > 0:  # dropout on the attention weight, per spot and head, as SDPA would apply it
            keep = (torch.rand(B, N, self.n_heads, 1, device=v.device) >= p).to(v.dtype)
            a = (a.reshape(B, N, self.n_heads, -1) * keep / (1 - p)).reshape(B, N, D)
        return a


class SinusoidalPosition(nn.Module):
    """Fixed 2-D sinusoidal encoding of spot centres in µm: half the channels for x, half for y."""

    def __init__(self, hidden: int, max_wavelength_um: float):
        super().__init__()
        n = hidden // 4
        freqs = torch.exp(-math.log(max_wavelength_um) * torch.arange(n) / max(n, 1))  # (n,)
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)
        self.pad = hidden - 4 * n

    def forward(self, coords_um: torch.Tensor) -> torch.Tensor:
        c = coords_um - coords_um.mean(dim=1, keepdim=True)  # (B, N, 2) translation-invariant
        ang = c[..., None] * self.freqs  # (B, N, 2, n)
        pe = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(2)  # (B, N, 4n)
        return F.pad(pe, (0, self.pad))  # (B, N, H)


class EncoderBlock(nn.Module):
    """Post-norm transformer encoder layer (as torch.nn.TransformerEncoderLayer) on fused SDPA, so
    no N x N matrix is materialised in Python."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.n_heads, self.dropout, self.attn_dropout = cfg.n_heads, cfg.dropout, cfg.attn_dropout
        self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.ff = nn.Sequential(
            nn.Linear(h, cfg.ff_mult * h),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ff_mult * h, h),
        )
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, H = x.shape
        q, k, v = (
            self.qkv(x).view(B, N, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        )  # (B, h, N, H/h)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, N, H/h)
        a = self.out(a.transpose(1, 2).reshape(B, N, H))  # (B, N, H)
        x = self.norm1(x + F.dropout(a, p, self.training))
        return self.norm2(x + F.dropout(self.ff(x), p, self.training))


class HistoPrism(nn.Module):
    """Patch embeddings of one slide (+ cancer type) -> log1p expression of every panel gene."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.in_dim, cfg.hidden
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.condition = CancerConditioning(cfg) if cfg.conditioning else None
        self.proj = nn.Linear(d, h)
        self.proj_neighbours = nn.Linear(d, h) if cfg.neighbours > 0 else None
        self.position = SinusoidalPosition(h, cfg.pe_scale_um) if cfg.positional_encoding else None
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.head_hidden = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Dropout(cfg.dropout))
        self.head_out = nn.Linear(h, cfg.n_genes)

    def trunk(
        self,
        features: torch.Tensor,
        condition: torch.Tensor,
        *,
        coords_um: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything up to the last linear layer: (B, N, D) -> (B, N, H).

        condition: (B,) int64 cancer index.  coords_um: (B, N, 2) float µm, needed with positional
        encoding.  neighbours: (B, N, K) int64 spot indices, needed when ``cfg.neighbours > 0``.
        """
        x = (features - self.feature_mean) / self.feature_std  # (B, N, D)
        if self.condition is not None:
            x = self.condition(x, condition)  # (B, N, D)
        h = self.proj(x)  # (B, N, H)
        if self.proj_neighbours is not None:
            h = h + self.proj_neighbours(_gather_mean(x, neighbours))  # (B, N, H)
        if self.position is not None:
            h = h + self.position(coords_um)
        for block in self.blocks:
            h = block(h)
        return self.head_hidden(h)  # (B, N, H)

    def forward(self, features: torch.Tensor, condition: torch.Tensor, **spatial) -> torch.Tensor:
        """(B, N, D) embeddings, (B,) cancer index -> (B, N, G) predicted log1p(counts)."""
        return self.head_out(self.trunk(features, condition, **spatial))


def _gather_mean(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean of x over each spot's neighbours: (B, N, D), (B, N, K) -> (B, N, D)."""
    B, N, K = index.shape
    picked = torch.gather(x, 1, index.reshape(B, N * K, 1).expand(-1, -1, x.shape[-1]))
    return picked.view(B, N, K, -1).mean(dim=2)
