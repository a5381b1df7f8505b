"""H&E-like images of the synthetic cohort: exact HEST/TIFF layouts, coordinates, determinism, and
pixels that show the tissue state the embeddings are built from."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from skimage.color import rgb2hed

from histoprism._core import keys
from histoprism.synthetic import cohort as synthetic
from histoprism.synthetic import images as synthetic_images
from histoprism.synthetic.geometry import NUCLEAR_BY_NICHE
from histoprism.synthetic.images import NICHE, PATCH_PX, Rendering, SpotLook
from histoprism.synthetic.tissue import frame_px, frame_shape

openslide = pytest.importorskip("openslide")

HALF = PATCH_PX // 2


@pytest.fixture(scope="module")
def imaged(tmp_path_factory) -> tuple[Path, dict[str, SpotLook]]:
    """tiny() with images, and the SpotLook each slide was rendered from."""
    looks: dict[str, SpotLook] = {}
    write = synthetic_images.write_slide_images

    def spy(look, barcodes, **kwargs):
        looks[Path(kwargs["patches_path"]).stem] = look
        return write(look, barcodes, **kwargs)

    config = dataclasses.replace(synthetic.tiny(), images=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic_images, "write_slide_images", spy)
        root = synthetic.make_cohort(tmp_path_factory.mktemp("imaged"), config=config)
    return root, looks


def _ids(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / keys.ST_DIR).glob("*.h5ad"))


def _patches(root: Path, sid: str) -> dict[str, np.ndarray]:
    with h5py.File(root / keys.PATCHES_DIR / f"{sid}.h5", "r") as fh:
        out = {k: fh[k][...] for k in fh}
        out["pixel_size"] = fh[keys.PATCH_IMG].attrs[keys.PATCH_ATTR_PIXEL_SIZE]
    return out


def _hematoxylin(img: np.ndarray) -> np.ndarray:
    """Mean hematoxylin optical density per patch (N,), on every 4th pixel."""
    return np.array([rgb2hed(p[::4, ::4])[..., 0].mean() for p in img])


def test_hest_patch_files(imaged):
    root, _ = imaged
    for sid in _ids(root):
        st = ad.read_h5ad(root / keys.ST_DIR / f"{sid}.h5ad")
        hp = _patches(root, sid)
        n = st.n_obs
        assert hp[keys.PATCH_IMG].shape == (n, PATCH_PX, PATCH_PX, 3)
        assert hp[keys.PATCH_IMG].dtype == np.uint8
        assert hp[keys.PATCH_COORDS].shape == (n, 2) and hp[keys.PATCH_COORDS].dtype == np.int64
        assert hp[keys.PATCH_BARCODE].shape == (n, 1) and hp[keys.PATCH_BARCODE].dtype.kind == "S"
        assert hp["pixel_size"] == pytest.approx(synthetic.UM_PER_PX)
        barcodes = np.char.decode(hp[keys.PATCH_BARCODE][:, 0], "ascii")
        np.testing.assert_array_equal(barcodes, st.obs_names.to_numpy())
        # top-left corner = spot centre - 112 px (224 px at 0.5 µm/px on a 0.5 µm/px slide)
        np.testing.assert_array_equal(hp[keys.PATCH_COORDS], st.obsm[keys.OBSM_SPATIAL] - HALF)


def test_wsi_is_a_pyramid_openslide_reads(imaged):
    root, _ = imaged
    frame = frame_px(frame_shape(synthetic.tiny()))
    for sid in _ids(root):
        with openslide.OpenSlide(root / keys.WSI_DIR / f"{sid}.tif") as slide:
            assert slide.properties["openslide.vendor"] == "generic-tiff"
            assert slide.dimensions == frame
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
            assert slide.level_count >= 4 and max(slide.level_dimensions[-1]) < 1024
            want = 2.0 ** np.arange(slide.level_count)
            np.testing.assert_allclose(slide.level_downsamples, want, rtol=2e-3)
            assert slide.properties["openslide.level[0].tile-width"] == "256"


def test_patches_are_the_wsi_at_the_spots(imaged):
    """The patch of spot i is the level-0 region at (centre - 112): proves the coordinates."""
    root, _ = imaged
    sid = _ids(root)[0]
    hp = _patches(root, sid)
    rows = np.linspace(0, len(hp[keys.PATCH_IMG]) - 1, 6).astype(int)
    with openslide.OpenSlide(root / keys.WSI_DIR / f"{sid}.tif") as slide:

        def region(x: int, y: int) -> np.ndarray:
            tile = slide.read_region((int(x), int(y)), 0, (PATCH_PX, PATCH_PX))
            return np.asarray(tile.convert("RGB"), dtype=np.float64)

        for i in rows:
            patch = hp[keys.PATCH_IMG][i].astype(np.float64)
            x, y = hp[keys.PATCH_COORDS][i]
            error = np.abs(region(x, y) - patch).mean()
            assert error < 5.0  # JPEG q90, 4:2:0
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # exact to the pixel
                assert error < np.abs(region(x + dx, y + dy) - patch).mean()


def test_non_image_files_identical_with_images(imaged, tiny_cohort):
    """Images draw their own random stream: every other file is byte-identical."""
    root, _ = imaged

    def digests(base: Path) -> dict[str, str]:
        skip = {keys.WSI_DIR, keys.PATCHES_DIR}
        return {
            str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in base.rglob("*")
            if p.is_file() and p.relative_to(base).parts[0] not in skip and p.name != "README.txt"
        }

    with_images, without = digests(root), digests(tiny_cohort)
    assert with_images.keys() == without.keys()
    assert with_images == without


def test_images_show_the_tissue(imaged):
    root, looks = imaged
    h_od, dense, nuclear, grey, fat = [], [], [], [], []
    for sid in _ids(root):
        img = _patches(root, sid)[keys.PATCH_IMG]
        look = looks[sid]
        h_od.append(_hematoxylin(img))
        dense.append(look.composition[:, [NICHE["tumour"], NICHE["immune"]]].sum(axis=1))
        nuclear.append(look.nuclear)
        grey.append(img.mean(axis=(1, 2, 3)))
        fat.append(look.composition[:, NICHE["adipose"]])
    h_od, dense, nuclear = np.concatenate(h_od), np.concatenate(dense), np.concatenate(nuclear)
    grey, fat = np.concatenate(grey), np.concatenate(fat)
    assert np.corrcoef(h_od, nuclear)[0, 1] > 0.5
    assert np.corrcoef(h_od, dense)[0, 1] > 0.5
    assert grey[fat > 0.5].mean() > grey[fat < 0.1].mean() + 20  # fat is white


def _look(n_side: int = 5, niche: str = "stroma") -> SpotLook:
    """A small hex patch of identical spots of one niche."""
    rows, cols = np.mgrid[:n_side, :n_side]
    x = 1000 + 200 * cols + 100 * (rows % 2)
    y = 1000 + 173 * rows
    comp = np.full((rows.size, 6), 0.02)
    comp[:, NICHE[niche]] = 0.9
    zeros = np.zeros(rows.size)
    xy = np.column_stack([x.ravel(), y.ravel()]).astype(np.int64)
    nuclear = comp @ NUCLEAR_BY_NICHE
    return SpotLook(xy, comp, nuclear, zeros, zeros)


def test_render_is_seeded_and_stain_varies_per_slide():
    look = _look()
    a = synthetic_images.render_slide(look, seed=0)
    b = synthetic_images.render_slide(look, seed=0)
    c = synthetic_images.render_slide(look, seed=1)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.origin == c.origin and a.image.shape == c.image.shape
    x0, y0 = np.asarray(a.origin)
    centre = (slice(1200 - y0, 1500 - y0), slice(1200 - x0, 1600 - x0))  # inside the spots
    mean_a = a.image[centre].reshape(-1, 3).mean(axis=0)
    mean_c = c.image[centre].reshape(-1, 3).mean(axis=0)
    assert np.abs(mean_a - mean_c).max() > 2.0  # same tissue, another stain


def test_pyramid_tiff_round_trip(tmp_path):
    y, x = np.mgrid[:512, :768]
    image = np.stack([60 + x // 6, 60 + y // 4, 120 + (x + y) // 20], axis=-1).astype(np.uint8)
    rendering = Rendering(image, (256, 512), (241, 242, 243))
    path = synthetic_images.write_pyramid_tiff(tmp_path / "s.tif", rendering, (1500, 1300))
    with openslide.OpenSlide(path) as slide:
        assert slide.dimensions == (1500, 1300)
        assert slide.level_dimensions[1] == (750, 650)
        got = np.asarray(slide.read_region((256, 512), 0, (768, 512)).convert("RGB"))
        assert np.abs(got.astype(float) - image).mean() < 2.0
        glass = np.asarray(slide.read_region((0, 0), 0, (64, 64)).convert("RGB"))
        np.testing.assert_allclose(glass.reshape(-1, 3).mean(axis=0), (241, 242, 243), atol=1.5)
        half = np.asarray(slide.read_region((256, 512), 1, (384, 256)).convert("RGB"))
        assert np.abs(half.astype(float) - image[::2, ::2]).mean() < 2.0


def test_images_share_the_geometry_without_importing_the_expression_model():
    # one definition of the lattice and niches (synthetic.geometry), and no import cycle
    code = (
        "import sys, histoprism.synthetic.images; "
        "assert not {'histoprism.synthetic.world', 'histoprism.synthetic.cohort'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert synthetic_images.NICHES is synthetic.NICHES
    assert synthetic_images.UM_PER_PX == synthetic.UM_PER_PX
