"""HistoPrism repository ``{id}_embeddings.pt`` files: weights-only load, validation, dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoprism._core.errors import InputError
from histoprism.io.readers import read_embeddings
from histoprism.io.readers.embeddings import read_torch_embeddings


def _rows(n: int = 5, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"AAAC{i:04d}-1": torch.randn(d, generator=g) for i in range(n)}


def test_barcode_dict_round_trip(tmp_path):
    rows = _rows()
    path = tmp_path / "S1_embeddings.pt"
    torch.save(rows, path)
    emb = read_torch_embeddings(path)
    assert list(emb.barcodes) == list(rows)
    assert emb.features.dtype == np.float32 and emb.features.shape == (5, 8)
    np.testing.assert_array_equal(emb.features, torch.stack(list(rows.values())).numpy())
    assert emb.coords.shape == (5, 2) and np.isnan(emb.coords).all()
    assert emb.path == path


def test_embeddings_barcodes_dict(tmp_path):
    rows = _rows(n=3, d=4)
    path = tmp_path / "S2_embeddings.pt"
    torch.save({"embeddings": torch.stack(list(rows.values())), "barcodes": list(rows)}, path)
    emb = read_torch_embeddings(path)
    assert list(emb.barcodes) == list(rows) and emb.features.shape == (3, 4)


def test_suffix_dispatch(tmp_path):
    path = tmp_path / "S1_embeddings.pt"
    torch.save(_rows(n=2, d=3), path)
    emb = read_embeddings(path)
    assert emb.features.shape == (2, 3) and emb.barcodes is not None


def test_nan_refused(tmp_path):
    rows = _rows()
    rows["AAAC0002-1"][1] = float("nan")
    path = tmp_path / "nan_embeddings.pt"
    torch.save(rows, path)
    with pytest.raises(InputError, match="NaN") as exc:
        read_embeddings(path)
    assert exc.value.path == path


def test_unequal_dims_refused(tmp_path):
    path = tmp_path / "dims_embeddings.pt"
    torch.save({"a": torch.zeros(4), "b": torch.zeros(5)}, path)
    with pytest.raises(InputError, match="one size"):
        read_embeddings(path)


class Opaque:
    """Not on torch's weights-only allowlist: loading it would need arbitrary unpickling."""

    def __init__(self) -> None:
        self.x = 1


def test_non_tensor_object_refused(tmp_path):
    path = tmp_path / "evil_embeddings.pt"
    torch.save({"AAAC-1": Opaque()}, path)
    with pytest.raises(InputError, match="weights-only") as exc:
        read_embeddings(path)
    assert str(path) in str(exc.value)


def test_non_tensor_value_refused(tmp_path):
    path = tmp_path / "ints_embeddings.pt"
    torch.save({"AAAC-1": [1.0, 2.0]}, path)
    with pytest.raises(InputError, match="tensors"):
        read_embeddings(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "junk_embeddings.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot load"):
        read_embeddings(path)
    with pytest.raises(InputError, match="not found"):
        read_embeddings(tmp_path / "missing.pt")
