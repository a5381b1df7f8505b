"""Spot-centred patches: the centre lands on the spot to a fraction of a level-0 pixel on every
level and pixel size, the level is the right one, edges pad white, tissue is told from glass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from histoprism._core.errors import InputError  # noqa: E402
from histoprism.images.patching import (  # noqa: E402
    PatchReport,
    iter_patch_batches,
    plan_patches,
    read_patch,
    tissue_fraction,
)
from histoprism.io.readers.wsi import open_wsi  # noqa: E402

CMU = Path("/work/shared/data/images/CMU-1-Small-Region.svs")
DOTS = (
    301,
    803,
    1306,
    1807,
)  # level-0 centres of 3x3 black dots (x and y), residues 1, 3, 2, 3 mod 4
TOLERANCE = 0.35  # level-0 px; a half-pixel slip in the centre convention would be 0.5


def write_pyramid(path: Path, img: np.ndarray, n_levels: int, mpp: float) -> Path:
    """Generic tiled TIFF that OpenSlide reads: 2x2-mean levels as successive tiled IFDs."""
    with tifffile.TiffWriter(path) as tif:
        for i in range(n_levels):
            res = 1e4 / (mpp * 2**i)  # pixels per cm
            tif.write(img, photometric="rgb", tile=(256, 256), compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=int(i > 0), metadata=None)  # fmt: skip
            h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
            img = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


def draw_dots(radius: int) -> np.ndarray:
    """White 2100 x 2100 image with black (2 radius + 1)-px square dots centred on DOTS x DOTS."""
    img = np.full((2100, 2100, 3), 255, np.uint8)  # (H, W, 3)
    for x in DOTS:
        for y in DOTS:
            img[y - radius : y + radius + 1, x - radius : x + radius + 1] = 0
    return img


@pytest.fixture(scope="module")
def dots_image() -> np.ndarray:
    return draw_dots(1)  # 3x3


@pytest.fixture(scope="module")
def dots_slide(dots_image, tmp_path_factory) -> Path:
    """Levels with downsample 1, 2, 4, written at 0.25 µm/px (tests override mpp at open)."""
    return write_pyramid(tmp_path_factory.mktemp("dots") / "dots.tif", dots_image, 3, 0.25)


@pytest.fixture(scope="module")
def big_dots_slide(tmp_path_factory) -> Path:
    """7x7 dots: still several patch pixels wide at 4 level-0 px per patch px, so their centroid
    in the patch is not dominated by uint8 rounding of a one-pixel blob."""
    return write_pyramid(tmp_path_factory.mktemp("dots") / "big_dots.tif", draw_dots(3), 3, 0.25)


def dot_error(wsi, dot_xy, centre_xy, *, target_mpp, size) -> tuple[float, int]:
    """Distance, in level-0 px, between the dot's centroid in the patch and where the geometry
    puts it; and the level read."""
    plan = plan_patches(wsi, np.array([centre_xy]), target_mpp=target_mpp, size=size)
    patch = read_patch(wsi, plan, centre_xy)
    assert patch.shape == (size, size, 3) and patch.dtype == np.uint8
    dark = np.clip(255 - patch.astype(np.float64).mean(axis=-1), 0, None)  # (size, size)
    rows, cols = np.indices(dark.shape)
    found = np.array([(dark * cols).sum(), (dark * rows).sum()]) / dark.sum()  # (x, y) pixel index
    s = size / plan.level0_px  # patch px per level-0 px
    # the dot's mass centre is level-0 point dot + 0.5; patch point size/2 is the spot centre; the
    # centroid of pixel indices sits half a pixel before the continuous coordinate
    expected = size / 2 + (np.asarray(dot_xy) + 0.5 - np.asarray(centre_xy)) * s - 0.5
    return float(np.abs(found - expected).max() / s), plan.level


@pytest.mark.parametrize(
    ("slide_mpp", "target_mpp", "level"),
    [(0.25, 0.5, 1), (0.5, 0.5, 0), (0.5, 1.0, 1), (0.3, 0.5, 0)],
    ids=["0.25->0.5 from ds2", "native", "0.5->1.0 from ds2", "0.3->0.5 from ds1"],
)
def test_dot_lands_on_patch_centre(dots_slide, slide_mpp, target_mpp, level):
    with open_wsi(dots_slide, mpp=slide_mpp) as wsi:
        for x in DOTS:
            for y in DOTS[:2]:
                err, read = dot_error(wsi, (x, y), (x, y), target_mpp=target_mpp, size=224)
                assert read == level
                assert err < TOLERANCE, (x, y, err)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    slide_mpp=st.floats(0.2, 0.6),
    ratio=st.floats(1.0, 3.9),  # target / slide mpp: levels with downsample 1 or 2
    size=st.sampled_from([48, 64, 100]),
    dot=st.tuples(st.sampled_from(DOTS), st.sampled_from(DOTS)),
    offset=st.tuples(st.floats(-0.25, 0.25), st.floats(-0.25, 0.25)),  # of the patch side
    integer=st.booleans(),
)
def test_dot_position_property(big_dots_slide, slide_mpp, ratio, size, dot, offset, integer):
    """Off-centre dots too: the patch maps level-0 points linearly, centre to centre."""
    side = size * ratio  # level-0 px, < 400: no other dot in the patch (dots 500 apart)
    centre = np.asarray(dot) + np.asarray(offset) * side
    centre = np.round(centre) if integer else centre
    with open_wsi(big_dots_slide, mpp=slide_mpp) as wsi:
        err, _ = dot_error(wsi, dot, tuple(centre), target_mpp=slide_mpp * ratio, size=size)
    assert err < TOLERANCE


def test_native_resolution_is_a_plain_crop(dots_slide, dots_image):
    """target_mpp == slide mpp: exactly level-0 pixels [x - 112, x + 112), HEST's patches."""
    rng = np.random.default_rng(0)
    img = dots_image.copy()
    img[400:900, 400:900] = rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)
    path = write_pyramid(dots_slide.with_name("noise.tif"), img, 1, 0.5)
    with open_wsi(path) as wsi:
        plan = plan_patches(wsi, np.array([[601, 650]]), target_mpp=0.5, size=224)
        np.testing.assert_array_equal(
            read_patch(wsi, plan, (601, 650)), img[650 - 112 : 650 + 112, 601 - 112 : 601 + 112]
        )


def test_plan_picks_best_level(dots_slide):
    centres = np.array([[1000, 1000]])
    with open_wsi(dots_slide, mpp=0.25) as wsi:
        for target, level in [(0.25, 0), (0.4, 0), (0.5, 1), (0.9, 1), (1.0, 2), (4.0, 2)]:
            plan = plan_patches(wsi, centres, target_mpp=target, size=224)
            assert plan.level == level, target
            assert plan.downsample == pytest.approx(2**level)
            assert plan.level0_px == pytest.approx(224 * target / 0.25)
            assert plan.read_px >= np.ceil(plan.level0_px / plan.downsample)


def test_out_of_bounds_padded_white_and_reported(tmp_path):
    pink = np.zeros((300, 400, 3), np.uint8) + np.array([220, 130, 190], np.uint8)
    path = tmp_path / "pink.tif"
    tifffile.imwrite(path, pink, photometric="rgb")
    centres = np.array([[10, 10], [200, 150], [395, 290], [32, 32]])
    with open_wsi(path, mpp=0.5) as wsi:
        plan = plan_patches(wsi, centres, target_mpp=0.5, size=64)
        assert plan.in_bounds.tolist() == [False, True, False, True]  # [32, 32]: touches, inside
        patch = read_patch(wsi, plan, centres[0])  # covers level-0 [-22, 42)
        assert (patch[:22, :] == 255).all() and (patch[:, :22] == 255).all()
        assert (patch[22:, 22:] == [220, 130, 190]).all()
        fractions = np.concatenate(
            [tissue_fraction(p) for _, p in iter_patch_batches(wsi, centres, size=64)]
        )
    report = PatchReport.from_plan(plan, fractions, slide="pink")
    assert (report.n_spots, report.n_out_of_bounds, report.n_tissue_free) == (4, 2, 0)
    assert "2 partly outside" in report.summary() and report.summary().startswith("pink: 4 patches")


def test_batches_cover_all_spots_in_order(dots_slide):
    centres = np.array([[x, y] for x in DOTS for y in DOTS[:2]], dtype=float)  # 8 spots
    with open_wsi(dots_slide, mpp=0.5) as wsi:
        batches = list(iter_patch_batches(wsi, centres, size=32, batch_size=3))
        assert [b[0].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]
        assert [b[1].shape for b in batches] == [(3, 32, 32, 3)] * 2 + [(2, 32, 32, 3)]
        plan = plan_patches(wsi, centres, size=32)
        np.testing.assert_array_equal(batches[1][1][2], read_patch(wsi, plan, centres[5]))
        with pytest.raises(InputError, match="not finite"):
            plan_patches(wsi, np.array([[1.0, np.nan]]))


def test_tissue_fraction_separates_glass_from_he():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(238, 4, (224, 224, 3)), 0, 255).astype(np.uint8)  # off-white glass
    black = np.zeros((224, 224, 3), np.uint8)
    eosin, haem = np.array([232, 160, 205]), np.array([110, 60, 150])
    mix = np.where(rng.random((224, 224, 1)) < 0.3, haem, eosin) + rng.normal(0, 8, (224, 224, 3))
    he = np.clip(mix, 0, 255).astype(np.uint8)
    fractions = tissue_fraction(np.stack([glass, black, he]))
    assert fractions.shape == (3,)
    assert fractions[0] < 0.05 and fractions[1] < 0.05 and fractions[2] > 0.95


@pytest.mark.skipif(not CMU.exists(), reason="sample slide absent")
def test_real_svs_patches():
    with open_wsi(CMU) as wsi:
        centres = np.array([[1110, 2226], [150, 150]])  # tissue (from the thumbnail); glass
        plan = plan_patches(wsi, centres, target_mpp=0.5, size=224)
        assert plan.level == 0 and plan.in_bounds.all()
        ((_, patches),) = iter_patch_batches(wsi, centres, target_mpp=0.5, size=224)
    assert patches.shape == (2, 224, 224, 3)
    tissue = tissue_fraction(patches)
    assert tissue[0] > 0.5 and tissue[1] < 0.1
