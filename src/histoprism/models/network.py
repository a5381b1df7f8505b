"""HistoPrism: cancer-type-conditioned transformer over all spots of a slide -> expression of every gene.

Reads top to bottom: conditioning -> projection (+ optional neighbourhood and position) -> encoder
-> head. Pure torch: no file I/O, no AnnData. Shapes: B slides (1 in training), N spots, D embedding
dim, H hidden width, G genes, T context tokens per condition, K neighbours per spot.

Attention is dense over all spots, as the paper, up to ``full_attention_max_spots``; above it (or
always, with ``attention="local"``) each spot attends to the spots within ``attention_radius_um``,
computed tile by tile in O(N) time and memory (``attention.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LocalPlan, local_attention, plan_tiles
from .spatial import RingContext, SpatialPlan, spatial_plan

SPOT_CHUNK = 8192  # spots per block of the per-spot layers: bounds the (chunk, D) temporaries
ATTENTION_MODES = ("auto", "full", "local", "mixed", "gated")
CONDITIONING_SITES = ("input", "hidden")
CONTEXT_FIELDS = ("organ", "technology")  # ModelConfig.context_fields: the slide context used
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # nonlinearity of the feed-forward and head


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
    # dropout on the z-scored embedding before anything reads it: for a linear map this is a
    # ridge penalty, so the network cannot fit noise in a wide embedding that a ridge would shrink
    input_dropout: float = 0.0
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
    # What surrounds a spot at several scales (``spatial.py``): outer radii (µm) of the rings
    # around it whose mean, gradient and tissue share the model reads; () for none.
    context_rings_um: tuple[float, ...] = ()
    ring_channels: int = 64  # width of the features the rings average (0: the hidden width)
    # > 0: spots much finer than this (Visium HD bins) are pooled into square sites of this side
    # (µm) for attention and rings, so their cost follows the tissue area, not the pitch
    site_um: float = 0.0
    standardize_inputs: bool = (
        False  # z-score embeddings with training-set statistics (stored buffers)
    )
    # Dense attention up to the paper's scale (19.6k patches), local above: 400 µm is 4 Visium
    # pitches (~58 spots; 2 layers see 800 µm, tissue-compartment scale) and ~2,000 Visium HD
    # 16 µm bins, whose cost grows as (radius / pitch)².
    # "full" (paper), "local" (within the radius), "auto": full up to max, "mixed": half the
    # heads within the radius, half over the whole slide up to max (all local above), "gated":
    # every head both, blended by a learned weight per head (its range; local above max)
    attention: str = "auto"
    attention_radius_um: float = 400.0  # local: a spot attends to the spots within this many µm
    full_attention_max_spots: int = 20_000  # auto: dense attention up to this many spots
    # Where the cancer type enters. "input" (the paper): cross-attention from the patch embedding
    # to the type's tokens, Add & LayerNorm, before the projection; the type's vector can grow
    # until the LayerNorm scales the spot's own signal away. "hidden": the same cross-attention
    # after the projection as a residual branch whose output layer starts at zero, so a fresh
    # model is exactly the unconditioned one and the spot's signal is never renormalised.
    conditioning_site: str = "input"
    norm_first: bool = False  # pre-norm encoder blocks and a final LayerNorm: the residual
    # stream carries each spot's own projection to the head unchanged (a per-spot skip path)
    # Subtract each slide's mean embedding before anything else: a slide's stain and scanner
    # shift its embeddings as a whole, and a model fitted on a few slides learns those shifts as
    # biology. Costs the slide-level mean, which per-slide metrics do not score (docs/recipes.md).
    # Applied where slides become tensors (``inputs.to_tensors``), over the whole
    # slide, so that training crops and tiled prediction see the same centre.
    centre_slides: bool = False
    # The authors' released network (the "paper" preset; ``authors.py`` imports its checkpoints)
    # differs from ours in three more places: ReLU (torch's TransformerEncoderLayer default) where
    # we use GELU, a LayerNorm inside the head, and no dropout on the cross-attention output
    # (torch's MultiheadAttention drops attention weights only; this one matters in training only).
    activation: str = "gelu"  # feed-forward and head nonlinearity: "gelu" or "relu"
    head_norm: bool = False  # LayerNorm between the head's hidden linear layer and its activation
    cross_output_dropout: bool = True  # dropout on the cancer cross-attention output before its add
    # Context beyond the cancer type, as STPath conditions on organ and technology: for each field
    # named here ("organ": metadata column organ, "technology": st_technology), a learned vector
    # per value (zero at the start) added to the cancer type's context tokens, so it reaches the
    # spots through the same conditioning block. Training fills the vocabularies below from its
    # slides ("Unknown" last, used for values it never saw).
    context_fields: tuple[str, ...] = ()
    organs: tuple[str, ...] = ()
    technologies: tuple[str, ...] = ()

    def __post_init__(self):
        # a config.json is user input: sizes must be positive integers (bool is not a size), and
        # the widths must split into the heads, before any module is built from them
        for name in ("in_dim", "n_genes", "n_conditions", "hidden", "n_layers", "n_heads",
                     "cross_heads", "ff_mult", "context_tokens", "full_attention_max_spots"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.neighbours is True or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise ValueError(f"neighbours must be an integer >= 0, got {self.neighbours!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by n_heads {self.n_heads}")
        for name in ("dropout", "attn_dropout", "input_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got '{self.attention}'")
        if not self.attention_radius_um > 0:
            raise ValueError(f"attention_radius_um must be > 0, got {self.attention_radius_um}")
        if self.conditioning_site not in CONDITIONING_SITES:
            raise ValueError(
                f"conditioning_site must be one of {CONDITIONING_SITES}, "
                f"got '{self.conditioning_site}'"
            )
        self.context_rings_um = tuple(float(r) for r in self.context_rings_um)
        rings = self.context_rings_um
        if rings and (rings[0] <= 0 or any(b <= a for a, b in zip(rings, rings[1:], strict=False))):
            raise ValueError(f"context_rings_um must be increasing radii > 0, got {list(rings)}")
        if (
            isinstance(self.ring_channels, bool)
            or not isinstance(self.ring_channels, int)
            or self.ring_channels < 0
        ):
            raise ValueError(f"ring_channels must be an integer >= 0, got {self.ring_channels!r}")
        if isinstance(self.site_um, bool) or not self.site_um >= 0:
            raise ValueError(f"site_um must be >= 0 µm, got {self.site_um!r}")
        for name in ("context_fields", "organs", "technologies"):  # JSON lists -> tuples
            setattr(self, name, tuple(str(v) for v in getattr(self, name)))
        unknown = set(self.context_fields) - set(CONTEXT_FIELDS)
        if unknown:
            raise ValueError(
                f"context_fields must be among {CONTEXT_FIELDS}, got {sorted(unknown)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(ACTIVATIONS)}, got '{self.activation}'"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class CancerConditioning(nn.Module):
    """Cross-attention from spot features (queries) to the cancer type's context tokens
    (keys/values). At the input (the paper): Add & LayerNorm on the patch embedding. In the
    hidden space: a pre-norm residual branch whose output layer starts at zero.

    With one token this computes the authors' layer (``nn.MultiheadAttention`` whose key and value
    are ``Linear(one-hot cancer)``) with D² + 2D fewer weights: their query projection (D² + D)
    cannot change a softmax over one key, so it never affects the output and its gradient is
    exactly zero (DDP refuses such weights), and a one-hot through a Linear is an Embedding row
    plus the bias, folded into each row here (D). ``authors.authors_parameter_count`` counts theirs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.residual = cfg.conditioning_site == "hidden"
        d = cfg.hidden if self.residual else cfg.in_dim
        self.n_heads, self.t = cfg.cross_heads, cfg.context_tokens
        self.tokens = nn.Embedding(cfg.n_conditions * cfg.context_tokens, d)
        # one token needs no query projection (see _single_token): DDP wants no unused weights
        self.q = nn.Linear(d, d) if cfg.context_tokens > 1 else None
        self.kv, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)
        # input: after the add; hidden: on the queries, which one token does not need
        self.norm = nn.LayerNorm(d) if not self.residual or self.t > 1 else None
        self.dropout = cfg.dropout
        self.output_dropout = cfg.cross_output_dropout
        if self.residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, D = x.shape
        ids = condition[:, None] * self.t + torch.arange(self.t, device=x.device)  # (B, T)
        ctx = self.tokens(ids)  # (B, T, D)
        if context is not None:  # the slide's organ/technology vectors join its cancer tokens
            ctx = ctx + context[:, None]
        p = self.dropout if self.training else 0.0
        if self.t == 1:
            a = self._single_token(ctx, N, p)  # (B, N or 1, D)
        else:
            q_in = self.norm(x) if self.residual else x
            q = self.q(q_in).view(B, N, self.n_heads, -1).transpose(1, 2)  # (B, h, N, D/h)
            kv = self.kv(ctx).view(B, self.t, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=p)  # (B, h, N, D/h)
            a = self.out(a.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        if self.output_dropout:
            a = F.dropout(a, p, self.training)
        return x + a if self.residual else self.norm(x + a)

    def _single_token(self, ctx: torch.Tensor, N: int, p: float) -> torch.Tensor:
        """Softmax over one key is 1, so every query receives the value whatever the query is:
        the general path's output without its (N, D) x (D, D) projections. Without dropout that
        is one vector per slide, (B, 1, D), broadcast over the spots by the residual add."""
        B, _, D = ctx.shape
        v = self.kv(ctx)[..., D:]  # (B, 1, D)
        if p == 0:
            return self.out(v)  # (B, 1, D)
        # dropout on the attention weight, per spot and head, as SDPA would apply it; out() is
        # linear, so project each head's slice of v once and mix the heads per spot
        keep = (torch.rand(B, N, self.n_heads, device=v.device) >= p).to(v.dtype) / (1 - p)
        w = self.out.weight.view(D, self.n_heads, -1)  # (D, h, D/h)
        per_head = torch.einsum("dhk,bhk->bhd", w, v.view(B, self.n_heads, -1))  # (B, h, D)
        return keep @ per_head + self.out.bias  # (B, N, D)


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
    """Transformer encoder layer (as torch.nn.TransformerEncoderLayer: post-norm, or pre-norm with
    ``norm_first``) on fused SDPA, so no N x N matrix is materialised in Python; with local
    plans, attention within a radius."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.n_heads, self.dropout, self.attn_dropout = cfg.n_heads, cfg.dropout, cfg.attn_dropout
        self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.ff = nn.Sequential(
            nn.Linear(h, cfg.ff_mult * h),
            ACTIVATIONS[cfg.activation](),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ff_mult * h, h),
        )
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.norm_first = cfg.norm_first
        # "gated": sigmoid(range_gate) is each head's weight on its local attention (0.5 at start)
        gated = cfg.attention == "gated"
        self.range_gate = nn.Parameter(torch.zeros(cfg.n_heads)) if gated else None

    def forward(
        self,
        x: torch.Tensor,
        local: list[LocalPlan] | None = None,
        sites: list[SpatialPlan] | None = None,
        dense_heads: int = 0,
    ) -> torch.Tensor:
        """x (B, N, H) -> (B, N, H). ``local``: plans of local attention (None: dense); with
        them, the last ``dense_heads`` heads still attend densely. ``sites``: one plan per slide
        whose pooled spots attend as sites (their mean), each spot then receiving its site's
        attention output."""
        B, N, H = x.shape
        p = self.dropout if self.training else 0.0
        y = self.norm1(x) if self.norm_first else x
        if sites is None or all(s.site is None for s in sites):
            a = self._attend(y, local, dense_heads)  # (B, N, H)
        else:  # attention over each slide's sites, spread back to its spots
            a = torch.stack(
                [
                    s.spread(
                        self._attend(s.pool(y[b])[None], local and local[b : b + 1], dense_heads)[0]
                    )
                    for b, s in enumerate(sites)
                ]
            )
        del y
        if not (self.training or torch.is_grad_enabled()):
            return self._per_spot_inference(x, a)
        a = F.dropout(self.out(a), p, self.training)  # (B, N, H)
        x = x + a if self.norm_first else self.norm1(x + a)
        # per spot: blocks of spots keep its (B, chunk, 4H) temporaries small without autograd
        y = self.norm2(x) if self.norm_first else x
        f = torch.cat([self.ff(c) for c in y.split(SPOT_CHUNK, dim=1)], dim=1)  # (B, N, H)
        f = F.dropout(f, p, self.training)
        return x + f if self.norm_first else self.norm2(x + f)

    def _attend(
        self, y: torch.Tensor, local: list[LocalPlan] | None, dense_heads: int = 0
    ) -> torch.Tensor:
        """Multi-head self-attention of y (B, N, H) before the output projection -> (B, N, H):
        dense without ``local`` plans; with them, local but for the last ``dense_heads`` heads."""
        B, N, H = y.shape
        q, k, v = self.qkv(y).view(B, N, 3, self.n_heads, -1).unbind(2)  # (B, N, h, H/h)
        p_attn = self.attn_dropout if self.training else 0.0
        gated = self.range_gate is not None and local is not None and dense_heads > 0
        n_local = 0 if local is None else self.n_heads - (0 if gated else dense_heads)
        first_dense = 0 if gated else n_local  # heads from here on attend over the whole slide
        parts = []
        if n_local:  # one plan per slide: its spots' neighbourhoods
            ql, kl, vl = (t[:, :, :n_local] for t in (q, k, v))
            parts.append(
                torch.stack(
                    [
                        local_attention(ql[b], kl[b], vl[b], local[b], dropout_p=p_attn)
                        for b in range(B)
                    ]
                )  # (B, N, h_local, H/h)
            )
        if first_dense < self.n_heads:
            qd, kd, vd = (t[:, :, first_dense:].transpose(1, 2) for t in (q, k, v))  # (B,h,N,H/h)
            parts.append(
                F.scaled_dot_product_attention(qd, kd, vd, dropout_p=p_attn).transpose(1, 2)
            )
        if gated:  # each head: its learned blend of local and slide-wide attention
            g = torch.sigmoid(self.range_gate)[:, None]  # (h, 1)
            a = parts[1] + g * (parts[0] - parts[1])
        else:
            a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return a.reshape(B, N, H)

    def attention_weights(
        self,
        x: torch.Tensor,
        coords_um: torch.Tensor | None = None,
        radius_um: float = 0.0,
        dense_heads: int = 0,
    ) -> torch.Tensor:
        """The attention of this layer on its input x (B, N, H): (B, h, N, N) softmax weights,
        row = query spot (for attribution; prediction never forms them). With ``coords_um``
        (B, N, 2): local attention, keys within ``radius_um`` of the query (``attention.py``),
        but for the last ``dense_heads`` heads (gated: every head's learned blend of both)."""
        B, N, H = x.shape
        y = self.norm1(x) if self.norm_first else x
        q, k, _ = self.qkv(y).view(B, N, 3, self.n_heads, -1).unbind(2)  # (B, N, h, H/h)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, N, H/h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, N)
        if coords_um is None:
            return torch.softmax(scores, dim=-1)
        c = coords_um.double()
        far = ((c[:, :, None] - c[:, None]).square().sum(-1) > radius_um**2)[:, None]  # (B,1,N,N)
        local = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1)
        dense = torch.softmax(scores, dim=-1)
        if self.range_gate is not None and dense_heads > 0:  # gated: every head's own blend
            g = torch.sigmoid(self.range_gate).to(local.dtype)[:, None, None]  # (h, 1, 1)
            return dense + g * (local - dense)
        n_local = self.n_heads - dense_heads
        is_local = torch.arange(self.n_heads, device=local.device) < n_local
        return torch.where(is_local[:, None, None], local, dense)

    def _per_spot_inference(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The layers after attention, block of spots by block, written over the attention
        output ``a`` (B, N, H): the same values as the training path without its (B, N, H)
        temporaries (a 600,000-bin Visium HD slide: ~0.6 GB each)."""
        for s in range(0, x.shape[1], SPOT_CHUNK):
            xs, at = x[:, s : s + SPOT_CHUNK], self.out(a[:, s : s + SPOT_CHUNK])
            if self.norm_first:
                xs = xs + at
                xs = xs + self.ff(self.norm2(xs))
            else:
                xs = self.norm1(xs + at)
                xs = self.norm2(xs + self.ff(xs))
            a[:, s : s + SPOT_CHUNK] = xs
        return a


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
        rings = cfg.context_rings_um
        self.rings = RingContext(d, cfg.ring_channels or h, h, len(rings)) if rings else None
        self.position = SinusoidalPosition(h, cfg.pe_scale_um) if cfg.positional_encoding else None
        if cfg.context_fields and not cfg.conditioning:
            raise ValueError("context_fields join the cancer-type conditioning: it must be on")
        d_ctx = h if cfg.conditioning_site == "hidden" else d
        self.organ = (
            _context_embedding(cfg.organs, d_ctx) if "organ" in cfg.context_fields else None
        )
        self.technology = (
            _context_embedding(cfg.technologies, d_ctx)
            if "technology" in cfg.context_fields
            else None
        )
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(h) if cfg.norm_first else nn.Identity()
        # the authors' head: Linear -> LayerNorm -> ReLU -> Dropout; ours has no LayerNorm
        norm = [nn.LayerNorm(h)] if cfg.head_norm else []
        act = ACTIVATIONS[cfg.activation]()
        self.head_hidden = nn.Sequential(nn.Linear(h, h), *norm, act, nn.Dropout(cfg.dropout))
        self.head_out = nn.Linear(h, cfg.n_genes)

    def trunk(
        self,
        features: torch.Tensor,
        condition: torch.Tensor,
        *,
        coords_um: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None,
        spatial: list[SpatialPlan] | None = None,
        centre: torch.Tensor | None = None,
        organ: torch.Tensor | None = None,
        technology: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything up to the last linear layer: (B, N, D) -> (B, N, H).

        condition: (B,) int64 cancer index.  coords_um: (B, N, 2) float µm, needed with positional
        encoding, local attention, rings and sites.  neighbours: (B, N, K) int64 spot indices,
        needed when ``cfg.neighbours > 0``.  spatial: one ``SpatialPlan`` per slide (built from
        coords_um when not given).  centre: (B, D) each slide's mean embedding, subtracted
        first (``centre_slides``; ``inputs.to_tensors`` gives it).  organ, technology: (B,)
        int64 indices into ``cfg.organs`` and ``cfg.technologies``, needed when
        ``cfg.context_fields`` names them.
        """
        # per-spot layers in blocks of spots: without autograd, memory holds one (B, chunk, D)
        # temporary of the wide inputs, not several (B, N, D) ones
        context = self._context(organ, technology)  # (B, D or H) or None
        shift = None if centre is None else centre[:, None]  # (B, 1, D)
        parts = [
            self._per_spot(f if shift is None else f - shift, condition, context)
            for f in features.split(SPOT_CHUNK, dim=1)
        ]
        h, nb, ring_in = (_cat_freeing(parts, i) for i in range(3))  # (B, N, H) each, or None
        if nb is not None:
            # the mean over neighbours commutes with the linear projection: gather H columns, not D
            h = h + _gather_mean(nb, neighbours)
        if spatial is None and self.needs_spatial_plan:
            spatial = [self.spatial_plan(c) for c in _need_coords(coords_um)]
        if ring_in is not None:  # in place: h is the concatenation's own, fresh tensor
            h += torch.stack([self.rings(ring_in[b], plan) for b, plan in enumerate(spatial)])
        del nb, ring_in
        if self.position is not None:
            h = h + self.position(coords_um)
        plans = self.local_plans(coords_um, h.shape[1], spatial)
        dense = self.dense_heads(h.shape[1] if spatial is None else max(p.n_sites for p in spatial))
        for block in self.blocks:
            h = block(h, plans, spatial, dense)
        if self.training or torch.is_grad_enabled():
            return self.head_hidden(self.final_norm(h))  # (B, N, H)
        for s in range(0, h.shape[1], SPOT_CHUNK):  # without autograd: over h, block by block
            h[:, s : s + SPOT_CHUNK] = self.head_hidden(self.final_norm(h[:, s : s + SPOT_CHUNK]))
        return h

    def _context(self, organ, technology) -> torch.Tensor | None:
        """Sum of the slide's organ and technology vectors (B, d), None without context fields."""
        out = None
        for field, table, ids in (("organ", self.organ, organ), ("technology", self.technology, technology)):  # fmt: skip
            if table is None:
                continue
            if ids is None:
                raise ValueError(f"the model conditions on the slide's {field}: give {field}=")
            out = table(ids) if out is None else out + table(ids)
        return out

    def _per_spot(self, features: torch.Tensor, condition: torch.Tensor, context=None):
        """(B, n, D) -> projection (B, n, H), neighbour projection (B, n, H) or None, ring
        input (B, n, H) or None."""
        x = (features - self.feature_mean) / self.feature_std  # (B, n, D)
        x = F.dropout(x, self.cfg.input_dropout, self.training)
        cond = self.condition
        if cond is not None and not cond.residual:  # the paper: on the patch embedding
            x = cond(x, condition, context)  # (B, n, D)
        nb = self.proj_neighbours(x) if self.proj_neighbours is not None else None
        ring_in = self.rings.inp(x) if self.rings is not None else None
        h = self.proj(x)  # (B, n, H)
        if cond is not None and cond.residual:  # in the hidden space, after the projection
            h = cond(h, condition, context)
        return h, nb, ring_in

    @property
    def needs_spatial_plan(self) -> bool:
        """Whether the trunk reads sites or rings (``spatial_plan`` of each slide)."""
        return bool(self.cfg.context_rings_um) or self.cfg.site_um > 0

    def spatial_plan(self, coords_um: torch.Tensor) -> SpatialPlan:
        """Sites and rings of one slide from its (N, 2) µm spot centres, on their device."""
        plan = spatial_plan(
            coords_um.detach().cpu().double().numpy(), self.cfg.context_rings_um, self.cfg.site_um
        )
        return plan.to(coords_um.device)

    def uses_local_attention(self, n_spots: int) -> bool:
        """Whether any head attends within the radius on a slide of ``n_spots`` spots (sites)."""
        mode = self.cfg.attention
        big = n_spots > self.cfg.full_attention_max_spots
        return mode in ("local", "mixed", "gated") or (mode == "auto" and big)

    def dense_heads(self, n_spots: int) -> int:
        """Heads attending over the whole slide of ``n_spots`` spots (sites)."""
        mode, small = self.cfg.attention, n_spots <= self.cfg.full_attention_max_spots
        if mode == "full":
            return self.cfg.n_heads
        if mode == "mixed" and small:
            return self.cfg.n_heads // 2
        if mode == "gated" and small:  # all heads, each blending its local part in
            return self.cfg.n_heads
        return self.cfg.n_heads if mode == "auto" and small else 0

    def local_plans(
        self,
        coords_um: torch.Tensor | None,
        n_spots: int,
        spatial: list[SpatialPlan] | None = None,
    ) -> list[LocalPlan] | None:
        """Tile plans of local attention, one per slide (built once, shared by the layers), or
        None for dense attention. With sites, over the sites: their number decides the mode."""
        if spatial is not None:
            n_spots = max(p.n_sites for p in spatial)
        if not self.uses_local_attention(n_spots):
            return None
        r = self.cfg.attention_radius_um
        if spatial is not None:  # a batch of copies of one slide (attribution) plans it once
            tiles = {
                id(p): plan_tiles(p.site_xy.float(), r, heads=self.cfg.n_heads) for p in spatial
            }
            return [tiles[id(p)] for p in spatial]
        return [plan_tiles(c.float(), r, heads=self.cfg.n_heads) for c in _need_coords(coords_um)]

    def head(self, h: torch.Tensor, genes: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> (..., G), or only the panel columns ``genes`` (G_m,): training computes the
        genes a slide measured and nothing else."""
        if genes is None:
            return self.head_out(h)
        return F.linear(h, self.head_out.weight[genes], self.head_out.bias[genes])

    def forward(
        self,
        features: torch.Tensor,
        condition: torch.Tensor,
        *,
        genes: torch.Tensor | None = None,
        **spatial,
    ) -> torch.Tensor:
        """(B, N, D) embeddings, (B,) cancer index -> (B, N, G) predicted log1p(counts)
        (or (B, N, G_m) for the panel columns ``genes``)."""
        return self.head(self.trunk(features, condition, **spatial), genes)


def _context_embedding(vocabulary: tuple[str, ...], hidden: int) -> nn.Embedding:
    """One learned (H,) vector per value of a context field, zero at the start."""
    if not vocabulary:
        raise ValueError("a context field needs its vocabulary (filled by training)")
    table = nn.Embedding(len(vocabulary), hidden)
    nn.init.zeros_(table.weight)
    return table


def _cat_freeing(parts: list[tuple], i: int) -> torch.Tensor | None:
    """Concatenate item ``i`` of every chunk's outputs along the spots, dropping the chunks' own
    references as it goes (a whole Visium HD slide holds each (B, N, H) once, not twice)."""
    if parts[0][i] is None:
        return None
    out = torch.cat([p[i] for p in parts], dim=1)
    for k, p in enumerate(parts):
        parts[k] = p[:i] + (None,) + p[i + 1 :]
    return out


def _need_coords(coords_um: torch.Tensor | None) -> torch.Tensor:
    if coords_um is None:
        raise ValueError("the model's spatial layers need the spot centres: coords_um (B, N, 2) µm")
    return coords_um


def _gather_mean(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean of x over each spot's neighbours: (B, N, D), (B, N, K) -> (B, N, D)."""
    B, N, K = index.shape
    picked = torch.gather(x, 1, index.reshape(B, N * K, 1).expand(-1, -1, x.shape[-1]))
    return picked.view(B, N, K, -1).mean(dim=2)
