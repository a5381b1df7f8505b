"""H&E-like images of the synthetic cohort: one pyramidal TIFF and one HEST patch file per slide.

An image shows what the synthetic embeddings are built from and nothing else: per spot, the niche
composition, the nuclear density, the stromal texture and a section-thickness nuisance (never
the hidden expression fields). A weights-free colour/texture encoder can therefore recover what
a pathology model could, and the ceiling of the cohort stays the ceiling.

Rendering, per slide, at the cohort's level-0 frame (0.5 µm/px, the pixels of ``obsm['spatial']``):

1. Fields. Per-spot values are spread to an 8 µm grid by Gaussian kernel regression (sd 40 µm),
   so neighbouring spots blend smoothly, and reach pixels by bilinear interpolation; the tissue
   mask is the kernel density of the spots (sd 50 µm) thresholded with a wobble, so tissue ends
   ~35 µm past the outer spot centres.
2. Objects, for the whole slide at once. Nuclei of six kinds (and red cells) are Poisson points
   on the grid with intensity = sum over niches of share x rate (``RATES``) x a nuclear-density
   gain; glands (a lumen and a ring of radially elongated nuclei) are Poisson in epithelium;
   adipocytes are the Voronoi cells of uniform seeds, visible where fat is.
3. Pixels, tile by tile. Nuclei are stamped from a bank of soft-edged kernels into a
   hematoxylin optical-density (OD) image; eosin OD comes from the niche mix plus collagen
   fibres (level sets of a wavy stream function; texture makes them stronger and straighter);
   necrosis is granular, lumens and fat are cleared to white; then Beer-Lambert with the slide's
   own stain vectors and intensities (the stain nuisance) and mild pixel noise.

Randomness: one ``numpy`` generator per slide from the ``seed`` argument, never the streams of the
expression and embeddings, so images change no other file of the cohort.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .._core.files import atomic_path
from ..io.readers.hest import write_hest_patches
from .geometry import NICHES, NUCLEAR_BY_NICHE, PITCH_UM, ROW_PITCH_UM, UM_PER_PX

log = logging.getLogger(__name__)

PX = 1.0 / UM_PER_PX  # level-0 pixels per µm
PATCH_PX = 224  # HEST patch side, pixels at UM_PER_PX
CELL_PX = 16  # grid of the smooth fields: 8 µm (divides tiles and strips)
VALUE_SIGMA_UM = 40.0  # kernel regression of per-spot values: blends neighbouring spots
MASK_SIGMA_UM = 50.0  # kernel density of spots -> tissue mask
MASK_LEVEL = (0.22, 0.40)  # density (1 = inside the hex grid) ramping from background to tissue
MARGIN_PX = 512  # rendered margin around the outer spot centres (tissue ends ~70 px past them)
TILE_PX = 1024  # render tile; also the period of the noise banks
PAD_PX = 76  # stamp margin of a tile: > twice the largest kernel radius (37, gland rings)
NUCLEAR_GAIN = 0.8  # log nuclei density per unit of nuclear density not explained by the niches

# nuclei per 1,000 µm² of each kind (columns) in each pure niche (rows, NICHES order)
KINDS = ("tumour", "lymphocyte", "spindle", "epithelial", "debris", "ghost", "rbc")
RATES = np.array(
    [  # tumour lymph spindle epith debris ghost  rbc
        [4.2, 0.4, 0.1, 0.0, 0.0, 0.0, 0.0],  # tumour: large pleomorphic, dense
        [0.0, 0.25, 1.0, 0.0, 0.0, 0.0, 0.05],  # stroma: sparse spindle cells along fibres
        [0.0, 16.0, 0.3, 0.0, 0.0, 0.0, 0.1],  # immune: small, round, very dark, packed
        [0.0, 0.15, 0.05, 0.8, 0.0, 0.0, 0.0],  # epithelium: plus the gland rings below
        [0.0, 0.3, 0.0, 0.0, 16.0, 1.5, 0.3],  # necrosis: karyorrhectic dust, ghost nuclei
        [0.0, 0.05, 0.15, 0.0, 0.0, 0.0, 1.2],  # adipose/vessel: few nuclei, red cells
    ]
)
GLAND_RATE = 0.3  # lumens per 1,000 µm² of pure epithelium (one per ~60 x 60 µm)
LUMEN_RADII_PX = (12, 16, 20, 24, 28)
FAT_RATE = 0.25  # adipocyte seeds per 1,000 µm² (cells ~65 µm across)
# background optical density (hematoxylin, eosin) of each pure niche: cytoplasm and matrix
BACKGROUND_OD = np.array(
    [
        [0.14, 0.30],  # tumour: amphophilic cytoplasm
        [0.03, 0.40],  # stroma: eosinophilic collagen
        [0.08, 0.16],  # immune: scant cytoplasm
        [0.05, 0.33],  # epithelium
        [0.11, 0.30],  # necrosis: pink-grey smudge
        [0.00, 0.02],  # adipose: empty
    ]
)
FIBRE_PERIOD_UM = 9.0  # spacing of collagen bundles (pale clefts between them)
# Macenko's reference H&E stain vectors (OD per unit stain, RGB)
STAIN_OD = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
STAIN_VECTOR_SD = 0.05  # per-slide jitter of each stain vector component (then renormalised)
STAIN_INTENSITY_SD = (0.12, 0.15)  # per-slide log-sd of the hematoxylin and eosin amounts
THICKNESS_GAIN = 0.08  # log OD per sd of the section-thickness nuisance
PIXEL_NOISE = 1.0  # sd of pixel noise, grey levels
FIBRE_WOBBLE = 1.2  # radians of fibre phase per sd of the fine wobble noise
NECROSIS_GRAIN = 0.25  # relative OD granularity of pure necrosis
STRIP_PX = 128  # rows shaded at once (fits in cache)
CELL_UM2 = (CELL_PX * UM_PER_PX) ** 2
NICHE = {name: i for i, name in enumerate(NICHES)}  # rows of RATES and BACKGROUND_OD
# rows of _Grid.values after the six niche shares (RESIDUAL: nuclear density the niches leave)
RESIDUAL, TEXTURE, THICKNESS = 6, 7, 8


@dataclass(frozen=True)
class SpotLook:
    """What the tissue under each spot shows: everything the renderer uses.

    xy: (N, 2) int64 spot centres, level-0 px (x, y).  composition: (N, 6) float niche shares
    (``NICHES`` order, rows sum to 1).  nuclear: (N,) float nuclear density (the synthetic
    driver).  texture: (N,) float stromal texture, ~N(0, 1).  thickness: (N,) float section
    thickness nuisance, ~N(0, 1).
    """

    xy: np.ndarray
    composition: np.ndarray
    nuclear: np.ndarray
    texture: np.ndarray
    thickness: np.ndarray


@dataclass(frozen=True)
class Rendering:
    """A rendered rectangle of a slide: ``image`` (H, W, 3) uint8 whose top-left pixel is
    level-0 pixel ``origin`` (x, y); ``background`` (RGB) is the slide's glass, outside tissue."""

    image: np.ndarray
    origin: tuple[int, int]
    background: tuple[int, int, int]


# --- kernels ------------------------------------------------------------------------------------


def _ellipse(a: float, b: float, angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft-edged ellipse (semi-axes a along ``angle``, b across; px) on a size x size grid.

    Returns (coverage, rho): coverage in [0, 1] with a ~1 px edge, rho the elliptical radius.
    """
    r = (size - 1) / 2
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return np.clip((1.0 - rho) * b / 1.2 + 0.5, 0.0, 1.0), rho


def _bank(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Kernel bank of one kind: (V, K, K) float32 kernels and (V,) angle bin of each (or -1)."""
    angles = np.arange(12) * np.pi / 12
    kernels, bins = [], []
    if kind == "tumour":  # large, pleomorphic, vesicular with a darker rim, a nucleolus
        for a in (9, 11, 13, 15, 17):
            for aspect in (1.0, 1.3, 1.6):
                for t in angles[::2]:
                    cover, rho = _ellipse(a, a / aspect, t, 37)
                    speckle = ndimage.gaussian_filter(rng.standard_normal(cover.shape), 1.0)
                    body = (0.45 + 0.55 * rho**2) * (1 + 0.8 * speckle)
                    cy, cx = 18 + rng.uniform(-0.3, 0.3, 2) * a / aspect
                    y, x = np.mgrid[:37, :37]
                    nucleolus = 0.9 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.3**2))
                    kernels.append(cover * (body + nucleolus))
                    bins.append(-1)
    elif kind == "lymphocyte":  # small, round, dense
        for r in (5.0, 6.0, 7.0):
            for aspect in (1.0, 1.15):
                for t in angles[::3]:
                    kernels.append(_ellipse(r, r / aspect, t, 17)[0])
                    bins.append(-1)
    elif kind in ("spindle", "epithelial"):  # oriented: spindles along fibres, epithelia radial
        axes = ((12, 2.5), (15, 3.0), (18, 3.5)) if kind == "spindle" else ((8, 6), (9, 6), (10, 7))
        size = 39 if kind == "spindle" else 23
        for i, t in enumerate(angles):
            for a, b in axes:
                cover, rho = _ellipse(a, b, t, size)
                kernels.append(cover * (0.9 if kind == "spindle" else 0.6 + 0.4 * rho**2))
                bins.append(i)
    elif kind == "debris":  # karyorrhexis: tiny dark specks
        kernels = [_ellipse(r, r, 0.0, 9)[0] for r in (1.0, 1.5, 2.0, 3.0)]
        bins = [-1] * 4
    elif kind == "ghost":  # pale outlines of dead nuclei
        kernels = [_ellipse(r, r, 0.0, 19)[0] for r in (6.0, 8.0)]
        bins = [-1] * 2
    elif kind == "rbc":  # biconcave red cells, eosin only
        for r in (6.0, 7.0):
            cover, rho = _ellipse(r, r, 0.0, 17)
            kernels.append(cover * (0.6 + 0.4 * rho**2))
            bins.append(-1)
    elif kind in ("lumen", "apical"):  # glands: a cleared disc, ringed by apical cytoplasm
        for r in LUMEN_RADII_PX:
            disc = _ellipse(r, r, 0.0, 75)[0]
            kernels.append(disc if kind == "lumen" else _ellipse(r + 9, r + 9, 0.0, 75)[0] - disc)
            bins.append(-1)
    size = max(k.shape[0] for k in kernels)
    out = np.zeros((len(kernels), size, size), dtype=np.float32)
    for i, k in enumerate(kernels):
        o = (size - k.shape[0]) // 2
        out[i, o : o + k.shape[0], o : o + k.shape[0]] = k
    return out, np.asarray(bins)


STAMP_KINDS = (*KINDS, "lumen", "apical")
# per kind: OD channel (0 hematoxylin, 1 eosin, 2 clearing), mean amplitude
STAMP = {
    "tumour": (0, 0.75),
    "lymphocyte": (0, 1.45),
    "spindle": (0, 1.05),
    "epithelial": (0, 0.9),
    "debris": (0, 1.3),
    "ghost": (0, 0.25),
    "rbc": (1, 0.9),
    "lumen": (2, 1.0),
    "apical": (1, 0.2),
}


@cache
def _banks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All kernel banks: fixed (seeded) so that every slide and run draws the same shapes."""
    rng = np.random.default_rng(20260)
    return {kind: _bank(kind, rng) for kind in STAMP_KINDS}


# --- smooth fields on the 10 µm grid ------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Fields on the CELL_PX grid of a rendered rectangle; cell (i, j) centres at
    ((j + 0.5) CELL_PX, (i + 0.5) CELL_PX) px from the rectangle's origin."""

    values: np.ndarray  # (9, gh, gw): 6 niche shares, RESIDUAL, TEXTURE, THICKNESS
    mask: np.ndarray  # (gh, gw) in [0, 1]: tissue
    psi: np.ndarray  # (gh, gw) px, stream function: collagen fibres are its level sets
    fibre_angle: np.ndarray  # (gh, gw) direction of the fibres (along psi's level sets), rad


def _splat(xy: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear splat of per-spot ``values`` (C, N) at px positions ``xy`` onto the grid."""
    u = xy / CELL_PX - 0.5  # (N, 2) grid coordinates (x, y)
    j0, i0 = np.floor(u).astype(np.int64).T
    fx, fy = (u - np.floor(u)).T
    out = np.zeros((len(values), *shape))
    for di, wy in ((0, 1 - fy), (1, fy)):
        for dj, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(out, (slice(None), i0 + di, j0 + dj), values * (wy * wx))
    return out


def _unit_field(rng: np.random.Generator, shape: tuple[int, int], sigma_um: float) -> np.ndarray:
    """Smooth Gaussian random field with unit sd on the grid."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_um * PX / CELL_PX)
    return field / field.std()


def _texture_level(texture: np.ndarray) -> np.ndarray:
    """Texture in (0, 1): strength and straightness of the collagen fibres."""
    return 1.0 / (1.0 + np.exp(-1.5 * texture))


def _grid(look: SpotLook, origin: np.ndarray, shape: tuple[int, int], rng) -> _Grid:
    """Kernel-regressed spot values, the tissue mask and the fibre field on the grid."""
    resid = look.nuclear - look.composition @ NUCLEAR_BY_NICHE
    raw = np.vstack([look.composition.T, resid, look.texture, look.thickness])  # (9, N)
    splat = _splat(look.xy - origin, np.vstack([np.ones((1, len(look.xy))), raw]), shape)
    s_val = VALUE_SIGMA_UM * PX / CELL_PX
    num = ndimage.gaussian_filter(splat, (0, s_val, s_val))
    values = num[1:] / np.maximum(num[0], 1e-12)
    cells_per_spot = PITCH_UM * ROW_PITCH_UM * PX**2 / CELL_PX**2  # density 1 inside the grid
    density = ndimage.gaussian_filter(splat[0], MASK_SIGMA_UM * PX / CELL_PX) * cells_per_spot
    density += 0.06 * _unit_field(rng, shape, 25.0)  # ragged edge
    lo, hi = MASK_LEVEL
    t = np.clip((density - lo) / (hi - lo), 0.0, 1.0)
    # fibres: a ramp across the slide's fibre direction, bent by a smooth field (less where the
    # texture is high: aligned fibres)
    y, x = np.mgrid[: shape[0], : shape[1]] * float(CELL_PX)
    t0 = rng.uniform(0, np.pi)
    bend = (1.2 - _texture_level(values[TEXTURE])) * 60.0 * PX * _unit_field(rng, shape, 60.0)
    psi = -x * np.sin(t0) + y * np.cos(t0) + bend
    gy, gx = np.gradient(psi)
    return _Grid(values, t * t * (3 - 2 * t), psi, np.arctan2(gy, gx) + np.pi / 2)


def _upsample(fields: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Bilinear interpolation of grid fields (C, gh, gw) float32 to the pixels [y0, y0+h) x
    [x0, x0+w) of the rectangle, all multiples of CELL_PX; returns (C, h, w) float32.

    Pixels CELL_PX * j + CELL_PX / 2 + k (k < CELL_PX) lie between cell centres j and j + 1 at
    the fraction (k + 0.5) / CELL_PX, the same for every j: interpolation is two broadcasts.
    """
    frac = ((np.arange(CELL_PX) + 0.5) / CELL_PX).astype(np.float32)
    half = CELL_PX // 2
    i0, j0 = y0 // CELL_PX, x0 // CELL_PX
    rows = np.clip(np.arange(i0 - 1, i0 + h // CELL_PX + 1), 0, fields.shape[1] - 1)
    cols = np.clip(np.arange(j0 - 1, j0 + w // CELL_PX + 1), 0, fields.shape[2] - 1)
    f = fields[:, rows][:, :, cols]  # (C, nh + 2, nw + 2)
    left = f[..., :-1]
    across = (left[..., None] + (f[..., 1:] - left)[..., None] * frac).reshape(*f.shape[:2], -1)
    across = across[..., half : half + w]  # (C, nh + 2, w)
    top = across[:, :-1]
    out = (top[:, :, None] + (across[:, 1:] - top)[:, :, None] * frac[:, None]).reshape(
        len(f), -1, w
    )
    return out[:, half : half + h]


# --- objects ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Objects:
    """Every stamped object of a slide, in rectangle px."""

    x: np.ndarray  # (M,) float
    y: np.ndarray  # (M,) float
    kind: np.ndarray  # (M,) int, index into STAMP_KINDS
    kernel: np.ndarray  # (M,) int, index into the kind's bank
    amplitude: np.ndarray  # (M,) float32, OD at the kernel's value 1


def _poisson_points(
    rng: np.random.Generator, per_cell: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of a Poisson process with the expected count ``per_cell`` (gh, gw) in each cell.

    Returns x, y (px, uniform within the cell) and the flat cell index of each point."""
    counts = rng.poisson(per_cell).ravel()
    cell = np.repeat(np.arange(counts.size), counts)
    i, j = np.divmod(cell, per_cell.shape[1])
    jitter = rng.uniform(0.0, CELL_PX, (2, cell.size))
    return j * CELL_PX + jitter[0], i * CELL_PX + jitter[1], cell


def _angle_bin(angle: np.ndarray) -> np.ndarray:
    return np.rint(np.mod(angle, np.pi) / (np.pi / 12)).astype(np.int64) % 12


def _pick_oriented(rng, bins: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Kernel index per object: a random size among the kernels of the wanted angle bin."""
    per_bin = np.bincount(bins[bins >= 0]).max()
    return want * per_bin + rng.integers(0, per_bin, len(want))


def _glands(rng, grid: _Grid, od_scale: np.ndarray) -> list[tuple]:
    """Lumens in epithelium and the ring of radially elongated nuclei around each."""
    per_cell = grid.values[NICHE["epithelium"]] * grid.mask * GLAND_RATE * CELL_UM2 / 1000
    x, y, cell = _poisson_points(rng, per_cell)
    size = rng.integers(0, len(LUMEN_RADII_PX), len(x))
    ring = np.asarray(LUMEN_RADII_PX, dtype=float)[size] + 12.0  # basal nuclei ~6 µm out
    count = np.floor(2 * np.pi * ring / (7.5 * PX)).astype(np.int64)
    gland = np.repeat(np.arange(len(x)), count)
    k = np.arange(len(gland)) - np.repeat(np.cumsum(count) - count, count)
    phi = rng.uniform(0, 2 * np.pi, len(x))[gland] + 2 * np.pi * k / count[gland]
    phi += rng.normal(0.0, 0.06, len(gland))
    r = ring[gland] + rng.normal(0.0, 2.0, len(gland))
    nx, ny = x[gland] + r * np.cos(phi), y[gland] + r * np.sin(phi)
    kernel = _pick_oriented(rng, _banks()["epithelial"][1], _angle_bin(phi))
    amp = STAMP["epithelial"][1] * rng.lognormal(0.0, 0.12, len(gland))
    amp *= od_scale.ravel()[cell][gland]
    apical = STAMP["apical"][1] * od_scale.ravel()[cell]
    lumen = (x, y, "lumen", size, np.ones(len(x)))
    return [lumen, (x, y, "apical", size, apical), (nx, ny, "epithelial", kernel, amp)]


def _objects(rng: np.random.Generator, grid: _Grid, od_scale: np.ndarray) -> _Objects:
    """Nuclei, red cells and glands of the whole rectangle; amplitudes include ``od_scale``."""
    comp = np.moveaxis(grid.values[:6], 0, -1)  # (gh, gw, 6)
    gain = np.exp(NUCLEAR_GAIN * grid.values[RESIDUAL])
    parts = []
    for c, kind in enumerate(KINDS):
        per_cell = (comp @ RATES[:, c]) * grid.mask * CELL_UM2 / 1000
        if kind != "rbc":  # red cells do not follow nuclear density
            per_cell *= gain
        x, y, cell = _poisson_points(rng, per_cell)
        kernels, bins = _banks()[kind]
        if kind == "spindle":
            kernel = _pick_oriented(rng, bins, _angle_bin(grid.fibre_angle.ravel()[cell]))
        else:
            kernel = rng.integers(0, len(kernels), len(x))
        amp = STAMP[kind][1] * rng.lognormal(0.0, 0.2 if kind == "tumour" else 0.1, len(x))
        parts.append((x, y, kind, kernel, amp * od_scale.ravel()[cell]))
    parts += _glands(rng, grid, od_scale)
    kind_ix = [np.full(len(p[0]), STAMP_KINDS.index(p[2])) for p in parts]
    return _Objects(
        x=np.concatenate([p[0] for p in parts]),
        y=np.concatenate([p[1] for p in parts]),
        kind=np.concatenate(kind_ix),
        kernel=np.concatenate([p[3] for p in parts]).astype(np.int64),
        amplitude=np.concatenate([p[4] for p in parts]).astype(np.float32),
    )


def _stamp(objects: _Objects, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Accumulate the objects overlapping a tile into (3, h, w) float32 OD: H, E, clearing."""
    hp, wp = h + 2 * PAD_PX, w + 2 * PAD_PX
    idx_parts, weight_parts = [], []
    for k, kind in enumerate(STAMP_KINDS):
        bank = _banks()[kind][0]
        size = bank.shape[1]
        r = size // 2  # objects up to r outside the tile reach into it; PAD_PX >= 2 r + 1
        x, y = objects.x, objects.y
        pick = (objects.kind == k) & (x >= x0 - r) & (x < x0 + w + r)
        pick &= (y >= y0 - r) & (y < y0 + h + r)
        if not pick.any():
            continue
        cx = np.rint(x[pick] - x0).astype(np.int64) + PAD_PX - r  # kernel top-left
        cy = np.rint(y[pick] - y0).astype(np.int64) + PAD_PX - r
        dy, dx = np.mgrid[:size, :size]
        offsets = (dy * wp + dx).ravel()
        channel = STAMP[kind][0] * hp * wp
        idx_parts.append(((cy * wp + cx + channel)[:, None] + offsets[None]).ravel())
        weights = bank[objects.kernel[pick]].reshape(pick.sum(), -1)
        weight_parts.append((weights * objects.amplitude[pick, None]).ravel())
    if not idx_parts:
        return np.zeros((3, h, w), dtype=np.float32)
    acc = np.bincount(
        np.concatenate(idx_parts), np.concatenate(weight_parts), minlength=3 * hp * wp
    ).reshape(3, hp, wp)
    return acc[:, PAD_PX : PAD_PX + h, PAD_PX : PAD_PX + w].astype(np.float32)


def _fat_membranes(seeds: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Adipocyte borders (h, w) float32 in {0, 1}: edges of the Voronoi cells of ``seeds`` (M, 2)
    (x, y px), computed at half resolution (membranes ~2 px = 1 µm thick)."""
    m = 160  # seeds this far outside the tile still own some of its pixels
    near = seeds[
        (seeds[:, 0] > x0 - m) & (seeds[:, 0] < x0 + w + m)
        & (seeds[:, 1] > y0 - m) & (seeds[:, 1] < y0 + h + m)
    ]  # fmt: skip
    if len(near) == 0:
        return np.zeros((h, w), dtype=np.float32)
    hh, ww = (h + 2 * m) // 2, (w + 2 * m) // 2
    label = np.zeros((hh, ww), dtype=np.int32)
    label[((near[:, 1] - y0 + m) // 2).astype(int), ((near[:, 0] - x0 + m) // 2).astype(int)] = (
        np.arange(1, len(near) + 1)
    )
    _, (iy, ix) = ndimage.distance_transform_edt(label == 0, return_indices=True)
    owner = label[iy, ix]
    edge = np.zeros(owner.shape, dtype=bool)
    edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    edge[1:, :] |= owner[1:, :] != owner[:-1, :]
    full = np.repeat(np.repeat(edge, 2, axis=0), 2, axis=1)
    return full[m : m + h, m : m + w].astype(np.float32)


# --- the slide ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stain:
    """A slide's stain: OD per unit of hematoxylin and eosin (2, 3) and the white level (3,)."""

    vectors: np.ndarray
    white: np.ndarray


def _stain(rng: np.random.Generator) -> _Stain:
    vectors = np.clip(STAIN_OD + rng.normal(0.0, STAIN_VECTOR_SD, STAIN_OD.shape), 0.05, None)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors *= np.exp(rng.normal(0.0, STAIN_INTENSITY_SD))[:, None]
    white = np.clip(rng.normal(244.0, 2.0) + rng.normal(0.0, 1.0, 3), 232.0, 252.0)
    return _Stain(vectors, white)


def _noise_banks(rng: np.random.Generator) -> np.ndarray:
    """Periodic TILE_PX x TILE_PX noise, the same in every tile so tiles join seamlessly:
    (3, P, P) float32 = fibre wobble (sd 3 µm), grain (sd 1 µm), pixel noise."""
    banks = rng.standard_normal((3, TILE_PX, TILE_PX))
    for i, sigma in ((0, 6.0), (1, 2.0)):
        banks[i] = ndimage.gaussian_filter(banks[i], sigma, mode="wrap")
        banks[i] /= banks[i].std()
    banks[2] *= PIXEL_NOISE
    return banks.astype(np.float32)


@dataclass(frozen=True)
class _Slide:
    """Everything a tile needs: per-pixel fields on the grid, objects, fat seeds, noise, stain."""

    fields: np.ndarray  # (6, gh, gw) float32: H bg, E bg, fibre amplitude, fat, grain, psi
    objects: _Objects
    fat_seeds: np.ndarray  # (F, 2) px (x, y)
    banks: np.ndarray  # (3, TILE_PX, TILE_PX) float32
    stain: _Stain


def _prepare(look: SpotLook, origin: np.ndarray, size: tuple[int, int], rng) -> _Slide:
    """Draw a slide's fields, objects and stain for the rectangle ``size`` (w, h) at ``origin``."""
    gshape = (size[1] // CELL_PX + 2, size[0] // CELL_PX + 2)
    grid = _grid(look, origin, gshape, rng)
    comp = grid.values[:6]
    od_scale = grid.mask * np.exp(THICKNESS_GAIN * grid.values[THICKNESS])
    fat = np.clip((comp[NICHE["adipose"]] - 0.25) / 0.35, 0.0, 1.0)
    level = _texture_level(grid.values[TEXTURE])
    stroma = comp[NICHE["stroma"]]
    fields = np.stack(
        [
            np.tensordot(BACKGROUND_OD[:, 0], comp, 1) * od_scale,
            np.tensordot(BACKGROUND_OD[:, 1], comp, 1) * od_scale,
            (stroma * (0.06 + 0.34 * level) + 0.08 * level) * od_scale,
            fat * fat * (3 - 2 * fat) * grid.mask,
            NECROSIS_GRAIN * comp[NICHE["necrosis"]] * grid.mask,
            grid.psi * (2 * np.pi / (FIBRE_PERIOD_UM * PX)),  # fibre phase
        ]
    ).astype(np.float32)
    stain, banks = _stain(rng), _noise_banks(rng)
    objects = _objects(rng, grid, od_scale)
    n_fat = rng.poisson(FAT_RATE * size[0] * size[1] * UM_PER_PX**2 / 1000)
    fat_seeds = rng.uniform(0, 1, (n_fat, 2)) * size
    return _Slide(fields, objects, fat_seeds, banks, stain)


def _shade(
    f: np.ndarray, stamps: np.ndarray, banks: np.ndarray, membrane, stain: _Stain, out: np.ndarray
) -> None:
    """Optical densities -> RGB for a strip: ``f`` (6, r, w) fields, ``stamps`` (3, r, w),
    ``banks`` (3, r, w), ``membrane`` (r, w) or None; writes ``out`` (r, w, 3) uint8."""
    h_bg, e_bg, fibre_amp, fat, grain_amp, phase = f
    wobble, grain, noise = banks
    # collagen: bundles split by pale clefts (where the wave crests), with fine fibrils along
    cleft = np.sin(phase + FIBRE_WOBBLE * wobble)
    cleft -= 0.5
    np.maximum(cleft, 0.0, out=cleft)
    fibres = np.sin(phase * 2.7 + 2.0 * grain)
    fibres *= 0.25
    fibres -= 2.0 * cleft
    fibres += 0.2  # about mean zero: fibres add contrast, not eosin
    fibres *= fibre_amp
    granular = grain_amp * grain
    granular += 1.0
    nuclei = stamps[0]
    hema = h_bg * granular
    hema += nuclei / (1.0 + 0.35 * nuclei)  # dense nuclei saturate
    eosin = e_bg * granular
    eosin += fibres
    eosin *= 1.0 - 0.6 * np.minimum(nuclei, 1.0)  # nuclei displace cytoplasm
    eosin += stamps[1]
    if membrane is not None:
        keep = 1.0 - fat
        hema *= keep
        eosin *= keep
        eosin += membrane * fat * 0.3
    clear = np.minimum(stamps[2], 1.0)
    clear *= -0.9
    clear += 1.0
    hema *= clear
    eosin *= clear
    scale = -np.log(10.0) * stain.vectors
    noise = noise * np.minimum(e_bg * 50.0, 1.0)  # scanner noise on tissue, clean glass
    noise += 0.5  # rounding
    for c in range(3):
        value = hema * scale[0, c]
        value += eosin * scale[1, c]
        np.exp(value, out=value)
        value *= stain.white[c]
        value += noise
        np.clip(value, 0.0, 255.0, out=value)
        out[..., c] = value


def _render_tile(slide: _Slide, y0: int, x0: int, out: np.ndarray) -> None:
    """Shade rectangle pixels [y0, y0+h) x [x0, x0+w) into ``out`` (h, w, 3) uint8, strip by
    strip and only where there is tissue; tiles start at multiples of TILE_PX (so the periodic
    noise banks line up) and h, w are multiples of CELL_PX."""
    h, w = out.shape[:2]
    stamps = _stamp(slide.objects, y0, x0, h, w)
    rows = slice(y0 // CELL_PX, (y0 + h) // CELL_PX + 2)
    fat = slide.fields[3, rows, x0 // CELL_PX : (x0 + w) // CELL_PX + 2].max() > 0.01
    membrane = _fat_membranes(slide.fat_seeds, y0, x0, h, w) if fat else None
    tissue = slide.fields[1] > 0  # eosin background: positive wherever the mask is
    for s in range(0, h, STRIP_PX):  # strips that stay in cache
        e = min(s + STRIP_PX, h)
        i = (y0 + s) // CELL_PX
        cells = tissue[max(i - 1, 0) : i + (e - s) // CELL_PX + 2, x0 // CELL_PX :][
            :, : w // CELL_PX + 2
        ]
        hit = np.flatnonzero(cells.any(axis=0))
        if len(hit) == 0:
            continue
        c0 = max(hit[0] - 2, 0) * CELL_PX  # a cell's value reaches 1.5 cells either side
        c1 = min((hit[-1] + 2) * CELL_PX, w)
        fields = _upsample(slide.fields, y0 + s, x0 + c0, e - s, c1 - c0)
        m = membrane[s:e, c0:c1] if fat else None
        banks = slide.banks[:, s:e, c0:c1]
        _shade(fields, stamps[:, s:e, c0:c1], banks, m, slide.stain, out[s:e, c0:c1])


def render_slide(
    look: SpotLook, *, seed: int | np.random.SeedSequence = 0, margin_px: int = MARGIN_PX
) -> Rendering:
    """Render the tissue around the spots of one slide, H&E-like, at UM_PER_PX.

    Parameters
    ----------
    look : the visible state of each spot.
    seed : seed of everything random in the image (nuclei, glands, fat, fibres, stain, noise).
    margin_px : rendered margin around the outer spot centres; must exceed PATCH_PX / 2.

    Returns
    -------
    Rendering of the spots' bounding box plus the margin (origin a multiple of 256 px), glass
    (the slide's white) where there is no tissue.
    """
    rng = np.random.default_rng(seed)
    lo = np.maximum((look.xy.min(axis=0) - margin_px) // 256 * 256, 0)
    hi = -(-(look.xy.max(axis=0) + margin_px) // 256) * 256
    width, height = (int(v) for v in hi - lo)
    slide = _prepare(look, lo, (width, height), rng)
    background = np.rint(slide.stain.white).astype(np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[...] = background
    cells = TILE_PX // CELL_PX + 2
    for y0 in range(0, height, TILE_PX):
        for x0 in range(0, width, TILE_PX):
            i, j = y0 // CELL_PX, x0 // CELL_PX
            if slide.fields[1, i : i + cells, j : j + cells].max() <= 0:
                continue  # no tissue: glass
            _render_tile(slide, y0, x0, image[y0 : y0 + TILE_PX, x0 : x0 + TILE_PX])
    return Rendering(image, (int(lo[0]), int(lo[1])), tuple(int(v) for v in background))


def cut_patches(rendering: Rendering, xy: np.ndarray, size: int = PATCH_PX) -> tuple:
    """HEST patches centred on spots: img (N, size, size, 3) uint8 and coords (N, 2) int64, the
    top-left corner in level-0 px (= centre - size / 2 at UM_PER_PX)."""
    topleft = np.asarray(xy, dtype=np.int64) - size // 2
    local = topleft - np.asarray(rendering.origin)
    h, w = rendering.image.shape[:2]
    if (local < 0).any() or (local[:, 0] + size > w).any() or (local[:, 1] + size > h).any():
        raise ValueError("a patch falls outside the rendered rectangle; enlarge margin_px")
    img = np.stack([rendering.image[y : y + size, x : x + size] for x, y in local])
    return img, topleft


# --- pyramidal TIFF -----------------------------------------------------------------------------


def _half(image: np.ndarray, band: int = 1024) -> np.ndarray:
    """2 x 2 box mean (H/2, W/2, 3) uint8, by Pillow in row bands (no full-size copy)."""
    out = np.empty((image.shape[0] // 2, image.shape[1] // 2, 3), dtype=np.uint8)
    for r in range(0, image.shape[0] - 1, band):
        part = Image.fromarray(np.ascontiguousarray(image[r : r + band])).reduce(2)
        out[r // 2 : r // 2 + part.height] = np.asarray(part)[: out.shape[0] - r // 2]
    return out


def _pyramid(rendering: Rendering, frame: tuple[int, int], min_px: int):
    """Yield (level image, its origin, level frame (w, h)) halving until the frame < min_px."""
    image, origin, (fw, fh) = rendering.image, np.asarray(rendering.origin), frame
    while True:
        yield image, origin, (fw, fh)
        if max(fw, fh) < min_px:
            return
        image = _half(image)
        origin, fw, fh = origin // 2, -(-fw // 2), -(-fh // 2)


def _tiles(image: np.ndarray, origin: np.ndarray, frame: tuple[int, int], tile: int, glass):
    """Row-major tiles of a ``frame`` (w, h) of ``glass`` colour holding ``image`` at ``origin``:
    (tile, tile, 3) uint8, or None for a tile of glass only."""
    ox, oy = origin
    ih, iw = image.shape[:2]
    for ty in range(0, frame[1], tile):
        for tx in range(0, frame[0], tile):
            y0, y1 = max(ty, oy), min(ty + tile, oy + ih)
            x0, x1 = max(tx, ox), min(tx + tile, ox + iw)
            if y0 >= y1 or x0 >= x1:
                yield None
                continue
            out = np.empty((tile, tile, 3), dtype=np.uint8)
            out[...] = glass
            out[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = image[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            yield out


def write_pyramid_tiff(
    path: str | Path,
    rendering: Rendering,
    frame: tuple[int, int],
    *,
    um_per_px: float = UM_PER_PX,
    tile: int = 256,
    quality: int = 90,
    min_px: int = 1024,
) -> Path:
    """Write a generic pyramidal tiled TIFF that OpenSlide opens (vendor ``generic-tiff``).

    Level 0 is the ``frame`` (width, height) px of glass with ``rendering`` at its origin; each
    further level halves it (area mean), down to the first under ``min_px``. Levels are
    successive pages (not SubIFDs, so OpenSlide sees the pyramid) marked reduced-resolution,
    tile x tile, JPEG at ``quality`` (tifffile + imagecodecs); X/YResolution in pixels per
    centimetre, so OpenSlide reports ``openslide.mpp-x/y``.
    """
    import tifffile

    path = Path(path)
    glass = np.empty((tile, tile, 3), dtype=np.uint8)
    glass[...] = rendering.background
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        for level, (image, origin, (w, h)) in enumerate(_pyramid(rendering, frame, min_px)):
            tiles = (glass if t is None else t for t in _tiles(image, origin, (w, h), tile, glass))
            px_per_cm = 1e4 / (um_per_px * 2**level)
            tif.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                software="histoprism.synthetic.images",
                metadata=None,
            )
    return path


def write_slide_images(
    look: SpotLook,
    barcodes: np.ndarray,
    *,
    wsi_path: str | Path,
    patches_path: str | Path | None,
    frame: tuple[int, int],
    seed: int | np.random.SeedSequence = 0,
) -> dict[str, float]:
    """Render one slide and write its pyramidal TIFF and (unless ``patches_path`` is None) its
    HEST patch file.

    Parameters
    ----------
    look : the visible state of each spot (xy in level-0 px of the frame).
    barcodes : (N,) str, one per spot, in ``look`` order (the patch file keeps this order).
    wsi_path, patches_path : where to write ``wsis/{id}.tif`` and ``patches/{id}.h5``.
    frame : (width, height) of level 0, px.
    seed : seed of the rendering.

    Returns
    -------
    Seconds spent rendering and writing: ``{"render_s", "write_s"}``.
    """
    start = time.perf_counter()
    rendering = render_slide(look, seed=seed)
    rendered = time.perf_counter()
    if patches_path is not None:
        img, coords = cut_patches(rendering, look.xy)
        write_hest_patches(patches_path, img, coords, barcodes, UM_PER_PX)
    write_pyramid_tiff(wsi_path, rendering, frame)
    seconds = {"render_s": rendered - start, "write_s": time.perf_counter() - rendered}
    log.debug("%s: rendered in %.1f s, written in %.1f s", wsi_path, *seconds.values())
    return seconds


__all__ = [
    "PATCH_PX",
    "Rendering",
    "SpotLook",
    "cut_patches",
    "render_slide",
    "write_pyramid_tiff",
    "write_slide_images",
]
