"""The built-in ``stain-texture`` encoder: 64 hand-made features per H&E patch, no weights.

Data path: patches (B, H, W, 3) uint8 RGB -> resized to (B, 3, 112, 112) float32 in [0, 1]
(a 2 x 2 mean for the 224 px patches of ``extract``) -> per block, vectorised over the batch:
colour, colour deconvolution (skimage's rgb2hed), tissue fractions, a nuclei proxy (hematoxylin
blobs), grey-level co-occurrence, local binary patterns and edges -> (B, 64) float32, named by
:data:`STAIN_TEXTURE_FEATURES`. Deterministic; imports neither torch nor timm.

The encoder registry (``encoders``) lists it as ``stain-texture`` and builds no network for it.
"""

from __future__ import annotations

import math

import numpy as np

from .._core.errors import InputError

STAIN_TEXTURE = "stain-texture"  # the encoder's name in the registry and under embeddings/
WORK_PX = 112  # features are computed at 112 x 112 px (a 224 px patch at 0.5 µm/px: 1 µm/px)
NUCLEUS_MIN_PX = 4  # smallest hematoxylin blob counted as a nucleus, in work px (~4 µm²)
H_FLOOR = 0.05  # lowest hematoxylin threshold (rgb2hed units): pure eosin yields no nuclei
H_MAX = 0.25  # hematoxylin is clipped to [0, H_MAX] for its co-occurrence matrix
LEVELS = 32  # grey levels of the co-occurrence matrices
GLCM_DISTANCES, GLCM_ANGLES = (1, 2), (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
_CHUNK = 256  # patches per vectorised step (~100 MB of work arrays)

STAIN_TEXTURE_FEATURES: tuple[str, ...] = (
    # colour (10): RGB in [0, 1]; saturation and value of HSV
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    "sat_mean", "sat_std", "val_mean", "val_std",
    # colour deconvolution (15): skimage rgb2hed; mean, std, 10th/50th/90th percentile
    *(f"{s}_{q}" for s in ("hem", "eos", "dab") for q in ("mean", "std", "q10", "q50", "q90")),
    # tissue (2): not white (grey < 0.85 or saturation > 0.1); dark (grey < 0.25)
    "tissue_frac", "dark_frac",
    # nuclei proxy (9): blobs (4-connected, >= NUCLEUS_MIN_PX) of hematoxylin > max(Otsu, H_FLOOR):
    # area fraction, log(1 + count), count per 1000 tissue px, mean and std of log blob area,
    # mean elongation (1 - minor/major axis), mean hematoxylin in blobs and in the other tissue,
    # mean eosin in blobs
    "nuc_area_frac", "nuc_log_count", "nuc_per_tissue", "nuc_log_size_mean", "nuc_log_size_std",
    "nuc_elong_mean", "nuc_hem_mean", "bg_hem_mean", "nuc_eos_mean",
    # co-occurrence (16): grey and clipped hematoxylin at 32 levels, symmetric and normalised,
    # offsets as skimage.feature.graycomatrix at distances 1 and 2, props averaged over 4 angles
    *(f"glcm_{img}_d{d}_{p}" for img in ("grey", "hem") for d in GLCM_DISTANCES for p in _GLCM_PROPS),
    # local binary patterns (10): uniform, P=8, R=1 on grey; fraction of pixels per code 0..9
    *(f"lbp_{i}" for i in range(10)),
    # edges (2): mean Sobel magnitude of grey; variance of its Laplacian (focus, fine texture)
    "sobel_mean", "laplace_var",
)  # fmt: skip


def stain_texture_features(patches: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 64) float32, see STAIN_TEXTURE_FEATURES; deterministic.

    Patches are first resized to 112 x 112 (a 2 x 2 mean for the 224 px patches of extract);
    every block is vectorised over the batch. Constant patches (white, black) give finite values.
    """
    patches = check_patches(patches)
    out = np.zeros((len(patches), len(STAIN_TEXTURE_FEATURES)), np.float32)
    for i in range(0, len(patches), _CHUNK):
        out[i : i + _CHUNK] = _stain_texture_batch(_to_work_size(patches[i : i + _CHUNK]))
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def check_patches(patches: np.ndarray) -> np.ndarray:
    """``patches`` as an array, or InputError unless it is (B, H, W, 3) uint8 RGB."""
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise InputError(
            f"patches must be (B, H, W, 3) uint8 RGB, got {patches.shape} {patches.dtype}"
        )
    return patches


def _to_work_size(patches: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, 112, 112) float32 in [0, 1], channels first."""
    b, h, w, _ = patches.shape
    x = np.ascontiguousarray(patches.transpose(0, 3, 1, 2), dtype=np.float32)  # (B, 3, H, W)
    if h % WORK_PX or w % WORK_PX:
        from skimage.transform import resize

        return resize(x / 255, (b, 3, WORK_PX, WORK_PX), anti_aliasing=True).astype(np.float32)
    fh, fw = h // WORK_PX, w // WORK_PX
    work = sum(x[..., i::fh, j::fw] for i in range(fh) for j in range(fw))  # block sums
    return work / (255 * fh * fw)


def _stain_texture_batch(rgb: np.ndarray) -> np.ndarray:
    """(B, 3, 112, 112) float32 RGB in [0, 1] -> (B, 64) features."""
    from skimage.color import hed_from_rgb

    b = len(rgb)
    r, g, bl = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    grey = 0.299 * r + 0.587 * g + 0.114 * bl  # (B, h, w)
    vmax, vmin = np.maximum(np.maximum(r, g), bl), np.minimum(np.minimum(r, g), bl)
    sat = (vmax - vmin) / np.maximum(vmax, 1e-6)
    # colour deconvolution exactly as skimage.color.rgb2hed, channels first
    od = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)  # (B, 3, h, w)
    hed = np.maximum(np.einsum("bchw,cs->bshw", od, hed_from_rgb.astype(np.float32)), 0)
    tissue = (grey < 0.85) | (sat > 0.1)
    sub = hed[..., ::2, ::2].reshape(b, 3, -1)  # percentiles on every other pixel: 4x cheaper
    quantiles = np.percentile(sub, (10, 50, 90), axis=2).transpose(1, 2, 0)  # (B, 3, 3)
    stains = np.concatenate(
        [hed.mean((2, 3))[..., None], hed.std((2, 3))[..., None], quantiles], axis=2
    )  # (B, 3 stains, 5): mean, std, q10, q50, q90
    blocks = [
        rgb.mean((2, 3)), rgb.std((2, 3)),
        np.stack([sat.mean((1, 2)), sat.std((1, 2)), vmax.mean((1, 2)), vmax.std((1, 2))], 1),
        stains,
        np.stack([tissue.mean((1, 2)), (grey < 0.25).mean((1, 2))], 1),
        _nuclei_features(hed, tissue),
        glcm_props(grey),
        glcm_props(np.clip(hed[:, 0] / H_MAX, 0, 1)),
        lbp_histograms(np.round(grey * 255)),
        _edge_features(grey),
    ]  # fmt: skip
    return np.concatenate([np.asarray(x, np.float64).reshape(b, -1) for x in blocks], axis=1)


def _otsu(images: np.ndarray, bins: int = 256) -> np.ndarray:
    """Otsu threshold of each image (B, ...) -> (B,), from a 256-bin histogram over its range."""
    b = len(images)
    flat = images.reshape(b, -1)
    lo, hi = flat.min(1), flat.max(1)
    width = np.maximum(hi - lo, 1e-12) / bins
    idx = np.minimum(((flat - lo[:, None]) / width[:, None]).astype(np.int64), bins - 1)
    hist = np.bincount((idx + np.arange(b)[:, None] * bins).ravel(), minlength=b * bins)
    hist = hist.reshape(b, bins).astype(np.float64)  # (B, bins)
    centres = lo[:, None] + (np.arange(bins) + 0.5) * width[:, None]  # (B, bins)
    w1, w2 = hist.cumsum(1), hist[:, ::-1].cumsum(1)[:, ::-1]  # pixels at or below / above
    m1 = (hist * centres).cumsum(1) / np.maximum(w1, 1)
    m2 = (hist * centres)[:, ::-1].cumsum(1)[:, ::-1] / np.maximum(w2, 1)
    between = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2  # (B, bins - 1)
    return np.take_along_axis(centres, between.argmax(1)[:, None], 1)[:, 0]


def _per_image_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over ``mask`` per image (B, h, w) -> (B,); 0 where the mask is empty."""
    n = mask.sum((1, 2))
    return np.where(n > 0, (values * mask).sum((1, 2)) / np.maximum(n, 1), 0.0)


def _nuclei_features(hed: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Hematoxylin blobs as a proxy for nuclei -> (B, 9), see STAIN_TEXTURE_FEATURES."""
    from scipy import ndimage

    b = len(hed)
    hem = hed[:, 0]
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, never across images
    labels, n = ndimage.label(hem > np.maximum(_otsu(hem), H_FLOOR)[:, None, None], structure)
    img, yy, xx = np.nonzero(labels)  # blob pixels
    lab = labels[img, yy, xx]
    size = np.bincount(lab, minlength=n + 1).astype(np.float64)  # (n + 1,); [0] unused
    kept = size >= NUCLEUS_MIN_PX
    kept[0] = False
    blob_img = np.zeros(n + 1, np.int64)
    blob_img[lab] = img  # the image each blob lies in
    count = np.bincount(blob_img[kept], minlength=b).astype(np.float64)  # (B,)

    def per_image(v: np.ndarray) -> np.ndarray:  # mean over each image's kept blobs
        return np.bincount(blob_img[kept], v, b) / np.maximum(count, 1)

    log_size = np.log(size[kept])
    mean_log = per_image(log_size)
    nuc = kept[labels]  # (B, h, w)
    return np.stack(
        [
            nuc.mean((1, 2)),
            np.log1p(count),
            count / np.maximum(tissue.sum((1, 2)), 1) * 1000,
            mean_log,
            np.sqrt(np.maximum(per_image(log_size**2) - mean_log**2, 0)),
            per_image(_elongation(lab, yy, xx, size)[kept]),
            _per_image_mean(hem, nuc),
            _per_image_mean(hem, tissue & ~nuc),
            _per_image_mean(hed[:, 1], nuc),
        ],
        axis=1,
    )


def _elongation(lab: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: np.ndarray) -> np.ndarray:
    """1 - minor/major axis of every blob from its pixels' second moments (0: round) -> (n + 1,)."""
    n, area = len(size), np.maximum(size, 1)
    y, x = yy.astype(np.float64), xx.astype(np.float64)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, v, n) / area

    my, mx = mean(y), mean(x)
    syy = mean(y * y) - my**2 + 1 / 12  # + the variance of a unit pixel
    sxx = mean(x * x) - mx**2 + 1 / 12
    sxy = mean(x * y) - mx * my
    half_trace, disc = (sxx + syy) / 2, np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    return 1 - np.sqrt(np.maximum(half_trace - disc, 0) / (half_trace + disc))


def glcm_props(images: np.ndarray) -> np.ndarray:
    """Co-occurrence props of images (B, h, w) in [0, 1] -> (B, 2 distances x 4 props).

    Equal to ``graycoprops`` of ``graycomatrix(q, GLCM_DISTANCES, GLCM_ANGLES, levels=32,
    symmetric=True, normed=True)``, ``q`` the image at 32 levels, averaged over the angles.
    """
    b, h, w = images.shape
    q = np.minimum(images * LEVELS, LEVELS - 1).astype(np.intp)  # (B, h, w)
    first = q * LEVELS + (np.arange(b) * LEVELS**2)[:, None, None]  # row index in stacked GLCMs
    counts: dict[tuple[int, int], np.ndarray] = {}
    glcm = np.zeros((b, len(GLCM_DISTANCES), len(GLCM_ANGLES), LEVELS, LEVELS))
    for di, d in enumerate(GLCM_DISTANCES):
        for ai, angle in enumerate(GLCM_ANGLES):
            dr, dc = round(np.sin(angle) * d), round(np.cos(angle) * d)  # skimage's offsets
            if (dr, dc) not in counts:  # (1, ±1) twice: skimage rounds 2 x sin(45°) to 1
                a = first[:, : h - dr, max(0, -dc) : w - max(0, dc)]
                c = q[:, dr:, max(0, dc) : w + min(0, dc)]
                pairs = np.bincount((a + c).ravel(), minlength=b * LEVELS**2)
                counts[dr, dc] = pairs.reshape(b, LEVELS, LEVELS)
            glcm[:, di, ai] = counts[dr, dc]
    glcm = glcm + glcm.swapaxes(-1, -2)  # symmetric
    glcm = glcm.reshape(-1, LEVELS * LEVELS)  # (B * dist * angle, L²)
    glcm /= np.maximum(glcm.sum(1, keepdims=True), 1)
    i, j = (v.ravel().astype(np.float64) for v in np.indices((LEVELS, LEVELS)))
    # sums over each matrix as products with weight vectors: one matmul instead of many passes
    weights = np.stack([(i - j) ** 2, 1 / (1 + (i - j) ** 2), i, j, i * i, j * j, i * j], 1)
    contrast, homogeneity, mu_i, mu_j, ii, jj, ij = (glcm @ weights).T
    energy = np.sqrt(np.einsum("nk,nk->n", glcm, glcm))
    var_i, var_j = np.maximum(ii - mu_i**2, 0), np.maximum(jj - mu_j**2, 0)
    flat = (var_i < 1e-30) | (var_j < 1e-30)  # skimage: correlation 1 if either std < 1e-15
    cov = ij - mu_i * mu_j
    correlation = np.where(flat, 1.0, cov / np.sqrt(np.where(flat, 1.0, var_i * var_j)))
    props = np.stack([contrast, homogeneity, energy, correlation], -1)  # (B * dist * angle, 4)
    return props.reshape(b, len(GLCM_DISTANCES), len(GLCM_ANGLES), 4).mean(2).reshape(b, -1)


def _uniform_lut() -> np.ndarray:
    """8-bit neighbour pattern -> uniform LBP code 0..9 (transitions counted as skimage does:
    between consecutive neighbours, not wrapping around)."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
    transitions = (bits[:, 1:] != bits[:, :-1]).sum(1)
    return np.where(transitions <= 2, bits.sum(1), 9).astype(np.uint8)


_LBP_LUT = _uniform_lut()


def lbp_codes(grey: np.ndarray) -> np.ndarray:
    """Uniform LBP codes (P=8, R=1) of images (B, h, w) on a 0..255 scale -> (B, h, w) in 0..9.

    Neighbours on the unit circle as skimage.feature.local_binary_pattern samples them (bilinear
    for the diagonals, 0 outside the image); a neighbour within 1e-3 of the centre counts as not
    darker, so flat regions are code 8 whatever the rounding of the interpolation.
    """
    b, h, w = grey.shape
    grey = grey.astype(np.float32)
    pad = np.pad(grey, ((0, 0), (1, 1), (1, 1)))  # (B, h + 2, w + 2)

    def at(dr: int, dc: int) -> np.ndarray:  # grey shifted by (dr, dc), zeros outside
        return pad[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

    pattern = np.zeros((b, h, w), np.uint8)
    for p in range(8):
        rp, cp = round(-np.sin(2 * np.pi * p / 8), 5), round(np.cos(2 * np.pi * p / 8), 5)
        r0, c0 = math.floor(rp), math.floor(cp)
        fr, fc = np.float32(rp - r0), np.float32(cp - c0)
        value = at(r0, c0)
        if fr and fc:  # diagonal: bilinear from the 4 surrounding pixels
            top = (1 - fc) * value + fc * at(r0, c0 + 1)
            bottom = (1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)
            value = (1 - fr) * top + fr * bottom
        pattern |= (value >= grey - 1e-3).astype(np.uint8) << p
    return _LBP_LUT[pattern]


def lbp_histograms(grey: np.ndarray) -> np.ndarray:
    """Fraction of pixels per uniform LBP code: (B, h, w) on a 0..255 scale -> (B, 10)."""
    codes = lbp_codes(grey).astype(np.intp)
    b = len(codes)
    hist = np.bincount((codes + 10 * np.arange(b)[:, None, None]).ravel(), minlength=10 * b)
    return hist.reshape(b, 10) / codes[0].size


def _edge_features(grey: np.ndarray) -> np.ndarray:
    """Mean Sobel magnitude and Laplacian variance of each image (B, h, w) -> (B, 2)."""
    from scipy import ndimage

    sobel = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)[None]  # (1, 3, 3)
    laplace = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)[None]
    g_r = ndimage.correlate(grey, sobel, mode="reflect")  # kernel depth 1: images never mix
    g_c = ndimage.correlate(grey, sobel.transpose(0, 2, 1), mode="reflect")
    lap = ndimage.correlate(grey, laplace, mode="reflect")
    return np.stack([np.hypot(g_r, g_c).mean((1, 2)), lap.var((1, 2))], 1)
