"""Whole-slide reading: OpenSlide on tifffile-written pyramids (generic TIFF, Aperio SVS), the
tifffile and Pillow backends, pixel-size precedence, padding, and the real sample files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from histoprism._core.errors import InputError  # noqa: E402
from histoprism.io.readers.wsi import open_wsi  # noqa: E402

IMAGES = Path("/work/shared/data/images")
CMU = IMAGES / "CMU-1-Small-Region.svs"
HE_PNG = IMAGES / "tiatoolbox_he_tile_1000px.png"


def pyramid(img: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Levels halved by 2x2 means (odd edges dropped), level 0 first."""
    levels = [img]
    for _ in range(n_levels - 1):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        levels.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    return levels


def write_generic_tiff(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """Generic tiled pyramidal TIFF as OpenSlide reads it: one tiled IFD per level (no SubIFDs),
    reduced levels marked NewSubfileType=1, resolution in pixels per centimetre."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (mpp * 2**i)
            tif.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path


def write_svs(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """Aperio-like SVS: tiled pages, the first ImageDescription 'Aperio Image Library ...|MPP = '."""
    h0, w0 = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for level in levels:
            h, w = level.shape[:2]
            desc = (
                f"Aperio Image Library v12.0.15\r\n{w0}x{h0} [0,0 {w0}x{h0}] (256x256) -> {w}x{h}"
            )
            desc += f" JPEG/RGB Q=70|AppMag = 40|MPP = {mpp}"
            tif.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                description=desc,
                metadata=None,
            )
    return path


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)  # (H, W, 3), odd-free sizes


def test_generic_tiff_read_by_openslide(tmp_path, image):
    levels = pyramid(image, 3)
    path = write_generic_tiff(tmp_path / "slide.tif", levels, mpp=0.25)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with open_wsi(path) as wsi:
        assert wsi.backend == "openslide"
        assert wsi.dimensions == (900, 700)
        assert wsi.level_dimensions == [(900, 700), (450, 350), (225, 175)]
        assert wsi.level_downsamples == pytest.approx([1, 2, 4])
        assert wsi.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(wsi.read_region(100, 60, 0, 300, 200), image[60:260, 100:400])
        # level-0 coordinates, level-1 pixels
        np.testing.assert_array_equal(wsi.read_region(100, 60, 1, 50, 40), levels[1][30:70, 50:100])


def test_reduced_levels_need_subfiletype(tmp_path, image):
    """Without NewSubfileType=1 OpenSlide sees level 0 only (openslide/openslide#328)."""
    path = tmp_path / "flat.tif"
    with tifffile.TiffWriter(path) as tif:
        for level in pyramid(image, 3):
            tif.write(level, photometric="rgb", tile=(256, 256), compression="zlib", metadata=None)
    assert openslide.OpenSlide(str(path)).level_count == 1


def test_svs_read_by_openslide(tmp_path, image):
    path = write_svs(tmp_path / "slide.svs", pyramid(image, 3), mpp=0.2527)
    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    with open_wsi(path) as wsi:
        assert wsi.backend == "openslide"
        assert wsi.level_count == 3
        assert wsi.mpp == pytest.approx(0.2527)
        np.testing.assert_array_equal(wsi.read_region(0, 0, 0, 64, 64), image[:64, :64])


def test_explicit_mpp_beats_the_file(tmp_path, image):
    path = write_generic_tiff(tmp_path / "slide.tif", [image], mpp=0.025)  # 10x too fine
    with open_wsi(path, mpp=0.25) as wsi:
        assert wsi.mpp == 0.25
    with pytest.raises(InputError, match="positive"):
        open_wsi(path, mpp=-1)


def test_non_square_pixels_mean_and_warn(tmp_path, image, caplog):
    path = tmp_path / "aniso.tif"
    tifffile.imwrite(
        path, image, photometric="rgb", resolution=(40000, 20000), resolutionunit="CENTIMETER"
    )
    with caplog.at_level(logging.WARNING, logger="histoprism.io.readers.wsi"):
        wsi = open_wsi(path)
    assert wsi.mpp == pytest.approx(0.375)
    assert "non-square" in caplog.text


def test_untiled_tiff_inch_resolution(tmp_path, image):
    """Stripped TIFF: OpenSlide rejects it, tifffile reads it; resolution in pixels per inch."""
    path = tmp_path / "strips.tif"
    tifffile.imwrite(
        path, image, photometric="rgb", resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH"
    )
    assert openslide.OpenSlide.detect_format(str(path)) is None
    with open_wsi(path) as wsi:
        assert wsi.backend == "tifffile"
        assert wsi.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(
            wsi.read_region(850, 650, 0, 100, 100)[:50, :50], image[650:, 850:]
        )
        assert (wsi.read_region(850, 650, 0, 100, 100)[50:, :] == 255).all()


def test_ome_tiff_pyramid_through_tifffile(tmp_path, image):
    """OME-TIFF: pyramid in SubIFDs and pixel size in the XML, both invisible to OpenSlide."""
    levels = pyramid(image, 3)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        opts = dict(photometric="rgb", tile=(256, 256), compression="zlib")
        tif.write(
            levels[0],
            subifds=2,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
            **opts,
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **opts)
    with open_wsi(path) as wsi:
        assert wsi.backend == "tifffile"
        assert wsi.level_count == 3
        assert wsi.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(wsi.read_region(200, 100, 2, 30, 20), levels[2][25:45, 50:80])


def test_screen_resolution_is_not_a_pixel_size(tmp_path, image):
    path = tmp_path / "72dpi.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(InputError, match="--mpp"):
        open_wsi(path)


def test_read_region_pads_white(tmp_path, image):
    path = write_generic_tiff(tmp_path / "slide.tif", pyramid(image, 2), mpp=0.5)
    with open_wsi(path) as wsi:
        region = wsi.read_region(-20, -10, 0, 50, 40)  # (40, 50, 3)
        assert region.shape == (40, 50, 3) and region.dtype == np.uint8
        assert (region[:10] == 255).all() and (region[:, :20] == 255).all()
        np.testing.assert_array_equal(region[10:, 20:], image[:30, :30])
        assert (wsi.read_region(5000, 5000, 1, 8, 8) == 255).all()


def test_best_level_never_upsamples(tmp_path, image):
    path = write_generic_tiff(tmp_path / "slide.tif", pyramid(image, 3), mpp=0.5)
    with open_wsi(path) as wsi:
        assert [wsi.best_level(d) for d in (0.5, 1, 1.9, 2, 3.9, 4, 100)] == [0, 0, 0, 1, 1, 2, 2]
        assert wsi.best_level(3.97) == 2  # within 1%: OpenSlide's 2.0004-style downsamples
        assert wsi.thumbnail(90).shape == (70, 90, 3)


def test_rgba_png_over_white_needs_mpp(tmp_path):
    from PIL import Image

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 15:, 3] = 255  # left half transparent
    path = tmp_path / "tile.png"
    Image.fromarray(rgba).save(path)
    with pytest.raises(InputError, match="pass --mpp"):
        open_wsi(path)
    with open_wsi(path, mpp=1.0) as wsi:
        assert wsi.backend == "pillow" and wsi.level_count == 1
        region = wsi.read_region(0, 0, 0, 30, 20)
        assert (region[:, :15] == 255).all()
        assert (region[:, 15:] == [200, 0, 0]).all()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="nope.svs") as err:
        open_wsi(tmp_path / "nope.svs")
    assert "no such" in str(err.value)
    junk = tmp_path / "junk.tif"
    junk.write_text("not an image")
    with pytest.raises(InputError, match="junk.tif"):
        open_wsi(junk)
    junk_png = tmp_path / "junk.png"
    junk_png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="junk.png"):
        open_wsi(junk_png, mpp=0.5)


@pytest.mark.skipif(not CMU.exists(), reason="sample slide absent")
def test_real_svs():
    with open_wsi(CMU) as wsi:
        assert wsi.backend == "openslide"
        assert wsi.dimensions == (2220, 2967)
        assert wsi.mpp == pytest.approx(0.499)


@pytest.mark.skipif(not HE_PNG.exists(), reason="sample tile absent")
def test_real_png():
    with open_wsi(HE_PNG, mpp=0.5) as wsi:
        assert wsi.backend == "pillow"
        assert wsi.dimensions == (1000, 1000)
        assert wsi.read_region(0, 0, 0, 10, 10).shape == (10, 10, 3)
    with pytest.raises(InputError) as err:
        open_wsi(HE_PNG)
    assert HE_PNG.name in str(err.value) and "--mpp" in str(err.value)
