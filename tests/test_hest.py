"""HEST-1k sample files: patches/{id}.h5 and metadata/{id}.json, written here in HEST's layout."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from histoprism._core.errors import InputError
from histoprism.io.cohort import Cohort
from histoprism.io.readers.hest import (
    hest_pixel_size,
    read_hest_metadata,
    read_hest_patches,
    write_hest_patches,
)


def _hest_patch_file(path, n=5, size=224, pixel_size=0.5, barcode_shape=(1,)):
    """Written with plain h5py the way HEST's save_hdf5 lays it out (barcode (N, 1) bytes)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    centres = rng.integers(500, 5000, (n, 2))
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("img", data=img, chunks=(1, size, size, 3))
        ds.attrs["pixel_size"] = pixel_size
        h5.create_dataset("coords", data=(centres - size // 2).astype(np.int64))
        codes = np.array([f"AAAC{i:04d}-1".encode() for i in range(n)])
        h5.create_dataset("barcode", data=codes.reshape(n, *barcode_shape))
    return img, centres


def test_reads_hest_layout_and_recovers_centres(tmp_path):
    img, centres = _hest_patch_file(tmp_path / "s.h5")
    hp = read_hest_patches(tmp_path / "s.h5")
    assert hp.n_patches == 5 and hp.patch_px == 224 and hp.pixel_size_um == 0.5
    assert list(hp.barcodes[:2]) == ["AAAC0000-1", "AAAC0001-1"]
    np.testing.assert_allclose(hp.centres(level0_mpp=0.5), centres)
    # on a 0.25 µm/px slide a 224 px patch at 0.5 µm/px spans 448 level-0 px: half is 224
    np.testing.assert_allclose(hp.centres(level0_mpp=0.25), hp.coords + 224)
    got = np.concatenate([b for _, b in hp.iter_batches(2)])
    np.testing.assert_array_equal(got, img)


def test_write_then_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    coords = np.array([[0, 0], [10, 20], [30, 40]])
    write_hest_patches(tmp_path / "p.h5", img, coords, np.array(["a", "b", "c"]), 0.5)
    with h5py.File(tmp_path / "p.h5") as h5:
        assert h5["barcode"].shape == (3, 1) and h5["barcode"].dtype.kind == "S"
        assert h5["coords"].dtype == np.int64
    hp = read_hest_patches(tmp_path / "p.h5")
    np.testing.assert_array_equal(hp.coords, coords)
    assert list(hp.barcodes) == ["a", "b", "c"]
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize(
    "breaker, message",
    [
        (lambda h5: h5.__delitem__("barcode"), "no 'barcode'"),
        (lambda h5: h5.__delitem__("img"), "no 'img'"),
        (
            lambda h5: (
                h5.__delitem__("coords"),
                h5.create_dataset("coords", data=np.zeros((4, 2))),
            ),
            "coords have shape",
        ),
    ],
)
def test_bad_patch_files_name_the_file(tmp_path, breaker, message):
    _hest_patch_file(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "bad.h5", "a") as h5:
        breaker(h5)
    with pytest.raises(InputError, match=message) as info:
        read_hest_patches(tmp_path / "bad.h5")
    assert "bad.h5" in str(info.value)


def test_metadata_json_with_bare_nan(tmp_path):
    path = tmp_path / "TENX95.json"
    path.write_text(
        '{"pixel_size_um_embedded": NaN, "pixel_size_um_estimated": 0.2737, "oncotree_code": "IDC"}'
    )
    meta = read_hest_metadata(path)
    assert meta["oncotree_code"] == "IDC"
    assert hest_pixel_size(meta) == pytest.approx(0.2737)
    assert hest_pixel_size({"pixel_size_um_embedded": 0.5, "pixel_size_um_estimated": 0.3}) == 0.5
    assert hest_pixel_size({}) is None
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="broken.json.*not valid JSON"):
        read_hest_metadata(tmp_path / "broken.json")


def test_cohort_pixel_size_falls_back_to_hest_json(tmp_path):
    pd.DataFrame({"id": ["A", "B"], "oncotree_code": ["IDC", "IDC"]}).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "A.json").write_text('{"pixel_size_um_embedded": 0.2125}')
    cohort = Cohort(tmp_path)
    assert cohort.pixel_size_um("A") == pytest.approx(0.2125)
    assert cohort.pixel_size_um("B") is None
    (tmp_path / "wsis").mkdir()
    (tmp_path / "wsis" / "A.svs").write_bytes(b"")
    assert cohort.wsi_path("A").name == "A.svs" and cohort.wsi_path("B") is None
