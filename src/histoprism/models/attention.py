"""Local self-attention over the spots of a slide: each spot attends to the spots within a radius.

Dense attention costs O(N²) in time (and in memory wherever no fused kernel applies, e.g. with
attention dropout on CPU); a Visium HD slide has 10⁵–10⁶ spots. Here spots are binned into square
tiles of side radius / s, so that every spot within the radius of a query lies in the block of
(2s + 1)² tiles around the query's tile. Each tile's spots are the queries, the spots of its block
the keys, and a mask keeps the pairs within the radius. Tiles are padded to common sizes and many
go through one SDPA call, so Python loops run over tile batches, and time and memory are
O(N · keys per tile). s = 2 computes 6.25 r² of key area per query instead of s = 1's 9 r² (the
disc itself is 3.14 r²), for more, smaller tiles.

Shapes: N spots, h heads, d head width, T tiles in a batch, Q query slots, K key slots per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORE_BUDGET = 2**23  # attention scores (T·h·Q·K floats) per SDPA call: 32 MB, cache-friendly
SPLIT = 2  # tiles per radius (s above)


@dataclass
class TileBatch:
    """Tiles that go through one SDPA call; padded slots repeat a real spot and are masked."""

    q: torch.Tensor  # (T, Q) int64 query spots; a padded slot repeats the tile's first spot
    q_valid: torch.Tensor  # (T, Q) bool
    k: torch.Tensor  # (T, K) int64 key spots (the tile block around the tile)
    k_valid: torch.Tensor  # (T, K) bool


@dataclass
class LocalPlan:
    """Which spots attend to which, for one slide: depends on coordinates only, so built once per
    forward and shared by every layer."""

    xy: torch.Tensor  # (2, N) float µm: x and y rows, gathered apart
    radius: float  # µm
    batches: list[TileBatch]  # every spot is a valid query of exactly one batch
    budget: int = SCORE_BUDGET  # scores per SDPA call; a larger tile's queries go in slices

    @property
    def key_slots(self) -> int:
        """Query-key pairs computed (padding included): the cost, vs N² for dense attention."""
        return sum(b.q.shape[0] * b.q.shape[1] * b.k.shape[1] for b in self.batches)


@torch.no_grad()
def plan_tiles(
    coords: torch.Tensor,
    radius: float,
    *,
    heads: int = 1,
    budget: int = SCORE_BUDGET,
    split: int = SPLIT,
) -> LocalPlan:
    """Bin spots (N, 2) µm into tiles of side ``radius / split`` and group the tiles into SDPA
    batches of at most ``budget`` scores (at least one tile each). An infinite radius: one tile."""
    dev = coords.device
    # a spot within the radius of a query lies within ``split`` tiles of the query's tile (tiles a
    # hair wider, in float64, so that rounding never puts it one tile further)
    c, side = coords.double(), radius / split * (1 + 1e-6)
    ij = torch.floor((c - c.min(0).values) / side).long() + split  # (N, 2), margin of ``split``
    nx = int(ij[:, 0].max()) + split + 1  # x ± split never wraps into another row of tiles
    tile_of = ij[:, 1] * nx + ij[:, 0]  # (N,)
    order = torch.argsort(tile_of, stable=True)  # spots grouped by tile
    tiles, counts = torch.unique_consecutive(tile_of[order], return_counts=True)  # (n_tiles,)
    starts = counts.cumsum(0) - counts
    span = range(-split, split + 1)
    offsets = torch.tensor([dy * nx + dx for dy in span for dx in span], device=dev)  # (B,)
    block = tiles[:, None] + offsets  # (n_tiles, B) ids of the (2s + 1)² block
    at = torch.searchsorted(tiles, block).clamp(max=len(tiles) - 1)
    found = tiles[at] == block
    block_start = torch.where(found, starts[at], 0)  # (n_tiles, B) into ``order``
    block_count = torch.where(found, counts[at], 0)
    n_keys = block_count.sum(1)  # (n_tiles,)

    batches = [
        _batch(order, starts[sel], counts[sel], block_start[sel], block_count[sel])
        for sel in _group(counts, n_keys, heads=heads, budget=budget)
    ]
    return LocalPlan(xy=coords.T.contiguous(), radius=float(radius), batches=batches, budget=budget)


def _group(counts: torch.Tensor, n_keys: torch.Tensor, *, heads: int, budget: int):
    """Tile indices per batch: tiles sorted by key count, so that a batch pads little, and cut
    greedily where the padded score block would exceed ``budget``."""
    by_size = torch.argsort(n_keys, descending=True, stable=True)
    q, k = counts[by_size].tolist(), n_keys[by_size].tolist()
    start, q_max = 0, 0
    for i in range(len(q)):  # one pass over tiles (not spots): cheap next to the attention
        q_new = max(q_max, q[i])
        if i > start and (i - start + 1) * heads * q_new * k[start] > budget:
            yield by_size[start:i]
            start, q_new = i, q[i]
        q_max = q_new
    yield by_size[start:]


def _batch(order, starts, counts, block_start, block_count) -> TileBatch:
    """Padded query and key index tensors for tiles with these (sorted-order) ranges."""
    Q, K = int(counts.max()), int(block_count.sum(1).max())
    slot = torch.arange(Q, device=order.device)
    q_valid = slot < counts[:, None]  # (T, Q)
    q = order[starts[:, None] + torch.where(q_valid, slot, 0)]
    # key slot p of a tile falls in block tile j where the running count first exceeds p
    end = block_count.cumsum(1)  # (T, B)
    p = torch.arange(K, device=order.device).repeat(len(counts), 1)  # (T, K)
    k_valid = p < end[:, -1:]
    j = torch.searchsorted(end, p, right=True).clamp(max=end.shape[1] - 1)
    pos = block_start.gather(1, j) + p - (end - block_count).gather(1, j)
    k = order[torch.where(k_valid, pos, starts[:, None])]
    return TileBatch(q=q, q_valid=q_valid, k=k, k_valid=k_valid)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LocalPlan, *, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention of each spot over the spots within ``plan.radius``: (N, h, d) x3 -> (N, h, d).

    Equals dense SDPA with the mask ``distance <= radius``; a spot always sees itself, so no row
    of the softmax is empty.
    """
    out = q.new_empty(q.shape)  # (N, h, d): each batch writes its queries' rows, once
    for b in plan.batches:
        mask = _additive_mask(plan, b)  # (T, 1, Q, K)
        kt, vt = (t.transpose(1, 2) for t in (k[b.k], v[b.k]))  # (T, h, K, d)
        # a batch is at least one tile; a dense one (Visium HD 8 µm bins: 625 queries x 15,625
        # keys) would pass the score budget many times, so its queries go in slices
        T, Q, K = *b.q.shape, b.k.shape[1]
        step = max(1, plan.budget // max(T * q.shape[1] * K, 1))
        for s in range(0, Q, step):
            rows, valid = b.q[:, s : s + step], b.q_valid[:, s : s + step]
            qt = q[rows].transpose(1, 2)  # (T, h, step, d)
            a = F.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=mask[:, :, s : s + step], dropout_p=dropout_p
            )
            out[rows[valid]] = a.transpose(1, 2)[valid]  # (queries of the slice, h, d)
    return out


def _additive_mask(plan: LocalPlan, b: TileBatch) -> torch.Tensor:
    """0 where key is within the radius of query, -inf elsewhere and on padded keys:
    (T, 1, Q, K). Built from x and y apart (no (T, Q, K, 2) temporary: this costs as much as the
    attention otherwise); padded keys sit at NaN, which compares false even to an infinite radius."""
    nan = torch.tensor(float("nan"), device=plan.xy.device)
    d2 = None
    for axis in plan.xy:  # x, then y
        kc = torch.where(b.k_valid, axis[b.k], nan)  # (T, K)
        d = axis[b.q][:, :, None] - kc[:, None]  # (T, Q, K)
        d2 = d.square_() if d2 is None else d2.add_(d.square_())
    return torch.where(d2 <= plan.radius**2, 0.0, float("-inf"))[:, None]
