"""The one embedding-file writer: what ``write_embeddings`` writes, ``read_embeddings`` reads."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histoprism._core import keys
from histoprism.io.readers import read_embeddings, write_embeddings
from histoprism.io.readers.embeddings import COORDS_ARE


def test_round_trip_with_barcodes_and_attrs(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 3))  # float64 in, float32 stored
    coords = rng.uniform(0, 5000, size=(5, 2)).astype(np.float32)  # float32 in, float64 stored
    barcodes = np.array(["AAAC-1", "é-2", "x", "y", "z"], dtype=object)  # not all ASCII
    path = tmp_path / "emb" / "s1.h5"
    attrs = {keys.H5_ATTR_ENCODER: "toy", keys.H5_ATTR_MPP: 0.5, keys.H5_ATTR_SOURCE: "wsi"}
    assert write_embeddings(path, features, coords, barcodes, **attrs) == path
    assert [p.name for p in path.parent.iterdir()] == ["s1.h5"]  # no partial file left

    back = read_embeddings(path)
    assert back.features.dtype == np.float32 and back.coords.dtype == np.float64
    np.testing.assert_array_equal(back.features, features.astype(np.float32))
    np.testing.assert_array_equal(back.coords, coords.astype(np.float64))
    assert list(back.barcodes) == list(barcodes)
    with h5py.File(path, "r") as h5:
        assert h5[keys.H5_COORDS].dtype == np.float64
        assert h5[keys.H5_BARCODES].dtype.kind == "S"  # UTF-8 bytes
        assert dict(h5.attrs) == attrs | {keys.H5_ATTR_COORDS_ARE: COORDS_ARE}


def test_mismatched_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not \\(N, D\\), \\(N, 2\\) and \\(N,\\)"):
        write_embeddings(tmp_path / "s.h5", np.zeros((3, 2)), np.zeros((2, 2)), ["a", "b", "c"])
    assert not list(tmp_path.iterdir())
