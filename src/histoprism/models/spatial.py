"""What surrounds a spot, at several scales, at a cost set by the tissue and not by the spot pitch.

Two pieces, both computed from the spot centres alone (``spatial_plan``, once per slide):

* **Sites.** Spots much finer than ``site_um`` (Visium HD bins) are pooled into square sites of
  that side; coarser spots (Visium, ST) are their own sites. Attention and the neighbourhood
  rings work on sites, so their cost follows the tissue area, while each spot keeps its own
  embedding on the per-spot path. A 600,000-bin 8 µm slide is ~9,000 sites of 64 µm.
* **Rings.** Around each site, the other sites in rings of outer radii ``rings_um`` (default
  150, 250 and 450 µm: one, two and about four Visium pitches). Per ring the model reads the mean
  of the sites' features, how strongly they change across the ring (the magnitude of their mean
  along the direction from the centre: a boundary, whatever the slide's orientation, which a
  scanner sets) and how much of the ring is tissue. One sparse operator per slide computes all
  of them: ``(3R, S) x (S, C)``, a few hundred non-zeros per site at any pitch.

Shapes: N spots, S sites, R rings, C context channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

POOL_BELOW = 0.5  # spots are pooled into sites when their pitch is below this share of site_um
OCCUPANCY_QUANTILE = 0.9  # a ring's site count, relative to this quantile over the slide


@dataclass
class SpatialPlan:
    """The sites of one slide and the ring operator over them (depends on coordinates only)."""

    site: torch.Tensor | None  # (N,) int64 site of each spot; None: every spot is its own site
    site_xy: torch.Tensor  # (S, 2) float32 µm: site centroids
    rings: torch.Tensor | None  # sparse (3R·S, S) float32: ring means, then x and y moments
    occupancy: torch.Tensor | None  # (S, R) float32: sites in each ring / its usual count
    rings_um: tuple[float, ...]
    site_um: float

    @property
    def n_sites(self) -> int:
        return self.site_xy.shape[0]

    def to(self, device: torch.device | str) -> SpatialPlan:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SpatialPlan(
            move(self.site),
            move(self.site_xy),
            move(self.rings),
            move(self.occupancy),
            self.rings_um,
            self.site_um,
        )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of spot rows over each site: (N, C) -> (S, C); x itself when unpooled."""
        if self.site is None:
            return x
        total = x.new_zeros(self.n_sites, x.shape[-1]).index_add_(0, self.site, x)
        count = torch.bincount(self.site, minlength=self.n_sites).clamp(min=1)
        return total / count[:, None].to(x.dtype)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """Each spot's site row: (S, C) -> (N, C); x itself when unpooled."""
        return x if self.site is None else x[self.site]


def spot_pitch(coords_um: np.ndarray) -> float:
    """Median distance (µm) from a spot to its nearest other spot; inf for a single spot."""
    if len(coords_um) < 2:
        return float("inf")
    d, _ = cKDTree(coords_um).query(coords_um, k=2)
    return float(np.median(d[:, 1]))


def spatial_plan(
    coords_um: np.ndarray | torch.Tensor, rings_um: tuple[float, ...], site_um: float = 0.0
) -> SpatialPlan:
    """Sites and ring operator of one slide from its (N, 2) spot centres in µm.

    ``site_um`` > 0 pools spots whose pitch is below ``POOL_BELOW * site_um`` into square sites
    of that side; ``rings_um``: increasing outer radii of the rings (empty: no ring operator).
    """
    xy = np.asarray(coords_um, dtype=np.float64)
    site = None
    if site_um > 0 and spot_pitch(xy) < POOL_BELOW * site_um:
        cell = np.floor((xy - xy.min(0)) / site_um).astype(np.int64)  # (N, 2)
        _, inverse = np.unique(
            cell[:, 0] * (cell[:, 1].max() + 1) + cell[:, 1], return_inverse=True
        )
        site = inverse.reshape(-1).astype(np.int64)
        count = np.bincount(site)
        site_xy = np.stack([np.bincount(site, xy[:, i]) / count for i in (0, 1)], axis=1)
    else:
        site_xy = xy
    rings = occupancy = None
    if rings_um:
        rings, occupancy = _ring_operator(site_xy, tuple(float(r) for r in rings_um))
    return SpatialPlan(
        site=None if site is None else torch.from_numpy(site),
        site_xy=torch.from_numpy(site_xy.astype(np.float32)),
        rings=rings,
        occupancy=occupancy,
        rings_um=tuple(float(r) for r in rings_um),
        site_um=float(site_um),
    )


def _ring_operator(xy: np.ndarray, rings_um: tuple[float, ...]):
    """Sparse (3R·S, S) operator and (S, R) occupancy for sites at ``xy`` (S, 2) µm."""
    n, R = len(xy), len(rings_um)
    if list(rings_um) != sorted(rings_um) or rings_um[0] <= 0:
        raise ValueError(f"rings must be increasing radii > 0 µm, got {rings_um}")
    pairs = cKDTree(xy).query_pairs(rings_um[-1], output_type="ndarray")  # (P, 2), i < j
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    delta = xy[j] - xy[i]  # (2P, 2) from the centre site to its neighbour
    dist = np.hypot(delta[:, 0], delta[:, 1])
    ring = np.searchsorted(np.asarray(rings_um), dist, side="left")  # (2P,) 0..R-1
    count = np.zeros((n, R))
    np.add.at(count, (i, ring), 1.0)
    share = 1.0 / np.maximum(count[i, ring], 1.0)  # each neighbour's weight in its ring's mean
    unit = delta / np.maximum(dist, 1e-9)[:, None]
    rows = [ring * n + i, (R + ring) * n + i, (2 * R + ring) * n + i]
    vals = [share, share * unit[:, 0], share * unit[:, 1]]
    index = torch.from_numpy(np.stack([np.concatenate(rows), np.tile(j, 3)]))
    op = torch.sparse_coo_tensor(
        index,
        torch.from_numpy(np.concatenate(vals).astype(np.float32)),
        (3 * R * n, n),
        check_invariants=False,  # built here: indices in range by construction
    ).coalesce()
    usual = np.maximum(np.quantile(count, OCCUPANCY_QUANTILE, axis=0), 1.0)  # (R,)
    occupancy = torch.from_numpy((count / usual).astype(np.float32))
    return op, occupancy


class RingContext(nn.Module):
    """Per-spot features -> what surrounds each spot's site, as an (N, H) addition to its hidden
    state. Reads the site's own mean (a Visium spot itself; a 64 µm pool of Visium HD bins) and,
    per ring, the mean, the direction-free gradient magnitude and the tissue share."""

    def __init__(self, in_dim: int, channels: int, hidden: int, n_rings: int):
        super().__init__()
        self.n_rings = n_rings
        self.inp = nn.Linear(in_dim, channels)
        self.out = nn.Linear(channels * (1 + 2 * n_rings) + n_rings, hidden)
        # zero at the start: a fresh model is the one without rings, which then learns how much
        # of its surroundings to read (a drawn world with weak context overfitted them otherwise)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, c: torch.Tensor, plan: SpatialPlan) -> torch.Tensor:
        """c: (N, C) projected spot features (``self.inp``) -> (N, H)."""
        s = plan.pool(c)  # (S, C)
        S, C, R = s.shape[0], s.shape[1], self.n_rings
        m = torch.sparse.mm(plan.rings, s).view(3, R, S, C)  # means, x moments, y moments
        grad = (m[1].square() + m[2].square() + 1e-6).sqrt()  # (R, S, C)
        parts = [s, *m[0], *grad, plan.occupancy]
        return plan.spread(self.out(torch.cat(parts, dim=-1)))  # (N, H)
