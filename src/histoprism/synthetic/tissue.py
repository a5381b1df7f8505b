"""One slide's visible tissue: what a spot shows, fixed before anything hidden is drawn.

Data path, per slide (``draw_tissue``, from the slide's own random stream): the frame of
``frame_shape(cfg)`` (rows, cols) hex positions -> an irregular tissue blob of N spots (flat
frame indices, sorted) -> Visium ``array_row``/``array_col`` (N,) and pixel centres ``xy`` (N, 2)
-> niche composition (N, 6) (softmax of smooth random fields plus the cancer's and the slide's
niche abundance) -> two visible covariates (nuclear density, stromal texture), neighbourhood
features within NEIGHBOURHOOD_UM and one slide-level feature -> ``Tissue``: the standardised
expression drivers (N, Kd) in VIS_DRIVERS order and the embedding MLP's input ``look`` (N, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

from .geometry import NICHES, NUCLEAR_BY_NICHE, PITCH_UM, ROW_PITCH_UM, UM_PER_PX
from .world import SyntheticConfig

# log relative niche abundance per cancer (rows: CANCERS, columns: NICHES)
NICHE_LOG_ABUNDANCE = np.array(
    [
        [0.5, 0.5, 0.0, 0.0, -1.0, 0.6],  # IDC: stroma- and fat-rich breast
        [0.7, 0.3, 0.0, 0.4, 0.0, -1.0],  # COAD: glands, dirty necrosis
        [0.3, 0.6, -0.5, 0.7, -1.5, -1.0],  # PRAD: benign glands, little immune
        [1.0, -0.3, 0.5, -0.5, 0.0, -0.5],  # SKCM: sheets of tumour, brisk infiltrate
        [0.8, 0.0, 0.2, -0.3, 0.3, 0.0],  # CCRCC: vessel-rich, necrotic
        [0.5, 0.2, 0.5, 0.2, -0.3, -1.0],  # LUAD
    ]
)
# typical mean and sd of each raw driver, to put them on one scale (measured on default cohorts)
DRIVER_CENTRE = np.array(
    [0.19, 0.2, 0.14, 0.17, 0.09, 0.13, 0.16, 0.0, 0.021, 0.027, 0.092, 0.027, 0.032]
)
DRIVER_SCALE = np.array(
    [0.21, 0.24, 0.19, 0.22, 0.12, 0.19, 0.72, 0.91, 0.027, 0.034, 0.09, 0.036, 0.042]
)
DRIVER_CAP = 3.0  # standardised drivers saturate smoothly at +-3

# --- geometry (Visium; the spot lattice and pixel size are in geometry.py) ---
VISIUM_FRAME = (78, 64)  # rows x spots per row (array_col 0..127, parity follows the row)
FRAME_ORIGIN_PX = 1200.0  # margin between image border and the first spot centre
NICHE_SIGMA_UM = 150.0  # smoothing of niche fields
TISSUE_SIGMA_UM = 500.0  # smoothing of the tissue outline field
NEIGHBOURHOOD_UM = 300.0  # radius of the neighbourhood features
NICHE_SHARPNESS = 2.2  # softmax gain: higher gives purer spots


# --- slide geometry -----------------------------------------------------------------------------


def frame_shape(cfg: SyntheticConfig) -> tuple[int, int]:
    """Rows x spots per row: the Visium frame, grown when slides need more than ~30% of it."""
    grow = max(1.0, np.sqrt(cfg.spots[1] / (0.3 * VISIUM_FRAME[0] * VISIUM_FRAME[1])))
    return int(np.ceil(VISIUM_FRAME[0] * grow)), int(np.ceil(VISIUM_FRAME[1] * grow))


def frame_px(shape: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the level-0 image of the hex frame: the spots plus FRAME_ORIGIN_PX."""
    x_max = FRAME_ORIGIN_PX + (2 * shape[1] - 1) * (PITCH_UM / 2) / UM_PER_PX
    y_max = FRAME_ORIGIN_PX + (shape[0] - 1) * ROW_PITCH_UM / UM_PER_PX
    return int(np.ceil(x_max + FRAME_ORIGIN_PX)), int(np.ceil(y_max + FRAME_ORIGIN_PX))


def smooth_fields(
    rng: np.random.Generator, n: int, shape: tuple[int, int], sigma_um: float
) -> np.ndarray:
    """Unit-variance Gaussian random fields on the hex frame, (n, rows, cols) float.

    Periodic ('wrap') filtering makes every value exactly N(0, 1), which the ceiling relies on.
    """
    sigma = (sigma_um / ROW_PITCH_UM, sigma_um / PITCH_UM)
    noise = rng.standard_normal((n, *shape))
    fields = ndimage.gaussian_filter(noise, sigma=(0, *sigma), mode="wrap")
    delta = np.zeros(shape)
    delta[0, 0] = 1.0
    kernel = ndimage.gaussian_filter(delta, sigma=sigma, mode="wrap")
    return fields / np.sqrt((kernel**2).sum())


def _tissue_spots(rng: np.random.Generator, shape: tuple[int, int], n_spots: int) -> np.ndarray:
    """Flat frame indices (n_spots,) of an irregular tissue blob, sorted."""
    rows, cols = np.indices(shape)
    y_um, x_um = rows * ROW_PITCH_UM, cols * PITCH_UM
    radius = np.sqrt(n_spots * PITCH_UM * ROW_PITCH_UM / np.pi)  # of a disk with n_spots
    cy = shape[0] * ROW_PITCH_UM * rng.uniform(0.4, 0.6)
    cx = shape[1] * PITCH_UM * rng.uniform(0.4, 0.6)
    aspect = np.exp(rng.normal(0.0, 0.25))  # elongated blobs
    d2 = ((x_um - cx) * aspect) ** 2 + ((y_um - cy) / aspect) ** 2
    score = -2.0 * d2 / radius**2 + smooth_fields(rng, 1, shape, TISSUE_SIGMA_UM)[0]
    return np.sort(np.argsort(-score.ravel(), kind="stable")[:n_spots])


def _hex_positions(spots: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Visium array indices and full-resolution pixel centres of frame spots.

    Returns ``array_row``, ``array_col`` (N,) int64 (array_col parity = array_row parity) and
    ``xy`` (N, 2) int64 pixel centres (x = column, y = row) at UM_PER_PX.
    """
    row, j = np.divmod(spots, shape[1])
    col = 2 * j + row % 2
    x = FRAME_ORIGIN_PX + col * (PITCH_UM / 2) / UM_PER_PX
    y = FRAME_ORIGIN_PX + row * ROW_PITCH_UM / UM_PER_PX
    xy = np.rint(np.stack([x, y], axis=1)).astype(np.int64)
    return {"array_row": row.astype(np.int64), "array_col": col.astype(np.int64), "xy": xy}


def _neighbour_mean(xy: np.ndarray, values: np.ndarray, radius_px: float) -> np.ndarray:
    """Mean of ``values`` (N, k) over the other spots within ``radius_px``; own value if none."""
    pairs = cKDTree(xy).query_pairs(radius_px, output_type="ndarray")
    n = len(xy)
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    count = np.asarray(adj.sum(axis=1))
    total = adj @ values
    return np.where(count > 0, total / np.maximum(count, 1), values)


# --- visible tissue state -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    """What a slide looks like: fixed when the ceiling integrates over what it does not show."""

    spots: np.ndarray  # (N,) int, flat frame indices
    array_row: np.ndarray  # (N,) int64
    array_col: np.ndarray  # (N,) int64
    xy: np.ndarray  # (N, 2) int64, spot centres in level-0 px (x, y)
    composition: np.ndarray  # (N, 6) float, niche shares (rows sum to 1)
    drivers: np.ndarray  # (N, Kd) float, standardised visible drivers of expression
    look: np.ndarray  # (N, S) float, per-spot visible state fed to the embedding MLP


def _composition(
    rng: np.random.Generator, shape: tuple[int, int], spots: np.ndarray, cancer: int
) -> np.ndarray:
    """Soft niche composition (N, 6): softmax of smooth fields plus cancer/slide abundance."""
    fields = smooth_fields(rng, len(NICHES), shape, NICHE_SIGMA_UM).reshape(len(NICHES), -1)
    fields = fields[:, spots].T  # (N, 6)
    fields[:, 4] = 0.6 * fields[:, 4] + 0.8 * fields[:, 0]  # necrosis sits inside tumour
    prior = NICHE_LOG_ABUNDANCE[cancer] + rng.normal(0.0, 0.5, len(NICHES))
    logits = NICHE_SHARPNESS * fields + prior
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def draw_tissue(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_spots: int,
    cancer: int,
    cfg: SyntheticConfig,
) -> Tissue:
    """Draw a slide's tissue: outline, niches, visible covariates and context drivers."""
    spots = _tissue_spots(rng, shape, n_spots)
    pos = _hex_positions(spots, shape)
    comp = _composition(rng, shape, spots, cancer)
    covariates = smooth_fields(rng, 4, shape, NICHE_SIGMA_UM).reshape(4, -1)[:, spots].T
    # nuclear density: cellular niches are dense, fat and necrosis are not; plus local variation
    nuclear = comp @ NUCLEAR_BY_NICHE + 0.5 * covariates[:, 0]
    texture = covariates[:, 1]  # e.g. collagen fibre alignment, visible and expression-relevant
    nbhd = _neighbour_mean(pos["xy"], comp, NEIGHBOURHOOD_UM / UM_PER_PX)  # (N, 6)
    tumour = comp[:, 0]
    hot = comp[:, 2].mean()  # slide-wide immune share: "hot" tumours respond everywhere
    context = [tumour * nbhd[:, 2], tumour * nbhd[:, 1], nbhd[:, 4], comp[:, 1] * nbhd[:, 0]]
    context.append(tumour * hot)
    raw = np.column_stack([comp, nuclear, texture, *context])  # order of VIS_DRIVERS
    # standardise, then saturate: products of shares are skewed and must not explode exp()
    drivers = DRIVER_CAP * np.tanh((raw - DRIVER_CENTRE) / DRIVER_SCALE / DRIVER_CAP)
    tell = np.zeros((n_spots, cfg.n_cancers))
    tell[:, cancer] = cfg.cancer_tell
    # the look: one spot's worth of tissue (no neighbourhood); two nuisance visible fields
    look = np.column_stack([(comp - 1 / 6) / 0.3, nuclear, texture, covariates[:, 2:], tell])
    # (the image renderer reads nuclear, texture and the first nuisance back: cohort._write_images)
    return Tissue(spots, pos["array_row"], pos["array_col"], pos["xy"], comp, drivers, look)
