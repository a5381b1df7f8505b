"""Fuzz every reader of histoprism with mutated inputs and count how each one fails.

The contract (``histoprism._core.errors``): bad input raises ``InputError`` (a ValueError) whose message
names the file. This script writes one valid seed of every format with the package's own writers
(``synthetic.make_cohort``, ``write_embeddings``, ``write_hest_patches``, ``import_checkpoint`` ...),
mutates copies of it and reads each copy the way a user would:

=============  =================================================================================
format         reader
=============  =================================================================================
h5ad           ``readers.read_st`` (``st/{id}.h5ad``)
embeddings_h5  ``readers.read_embeddings`` (ours and the TRIDENT layout)
embeddings_pt  ``readers.read_embeddings`` on a HistoPrism repository ``{id}_embeddings.pt``
spaceranger    ``readers.read_spaceranger`` (``outs/``: matrix h5, positions csv/list/parquet, json)
hest           ``readers.hest.read_hest_patches`` + every batch of pixels; ``read_hest_metadata``
gmt            ``genes.read_gmt``
metadata       ``cohort.Cohort(root)`` (``metadata.csv`` + ``splits/``)
run            ``predict.load`` (``config.json`` + ``model.safetensors``) + one forward pass
authors        ``authors.import_checkpoint`` (``config.yml`` + ``ckpt/best_model.pt``)
predict        ``predict.predict`` of one slide of a cohort with one mutated file (few cases)
wsi            ``readers.wsi.open_wsi`` + a region + a thumbnail (TIFF, OME-TIFF, PNG)
=============  =================================================================================

Mutations: byte flips (biased to file headers and to the bytes around names: HDF5 object headers
and attributes), truncation, appended garbage, zeroed blocks; HDF5 structure through h5py (drop,
rename, dangling links, groups for datasets, other dtypes, other shapes, NaN/inf/1e38, declared
size bombs: a chunked or virtual dataset of shape (10**9, ...) with no data written, duplicate and
invalid-UTF-8 barcodes, attributes); text (encodings, empty, binary, quotes, very long lines, NA
ids, delimiters, dropped columns ...); JSON/YAML structure (types, deep nesting, an alias bomb);
torch ``.pt`` structure (non-tensors, shapes, dtypes, NaN, pickled objects); safetensors headers.

Outcomes of one input:

    ok            the read succeeded and the result passes the format's invariants
    clean         InputError
    silent_wrong  the read succeeded but the result breaks an invariant (NaN coordinates ...)
    traceback     any other exception
    hang          no answer within --timeout seconds (the worker is killed and replaced)
    memory        MemoryError, or the worker killed by SIGKILL (the kernel's OOM killer)
    crash         the worker died of another signal (a segfault in a C library)
    fuzz_error    the mutation itself failed: a bug of this script (0 expected)

Each input is read in one of ``--workers`` worker processes that handle many inputs each, under
an address-space limit (``RLIMIT_AS``) of what the worker maps after its imports plus
``--memory-gib``. A hung worker is killed with its whole process group (readers may fork) and
replaced. Case ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` only, so any
case can be rebuilt and read again in this process with its traceback shown::

    python benchmarks/fuzz.py --n 10000 --seed 0 --out benchmarks/fuzz.json --formats all
    python benchmarks/fuzz.py --seed 0 --replay 123 --keep /tmp/case123

``tests/test_fuzz.py`` runs a few hundred of the same mutations in-process under hypothesis.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ENCODER = "synthetic"
SAMPLE = "SYN000"  # the slide whose files are mutated
OUTCOMES = ("ok", "clean", "silent_wrong", "traceback", "hang", "memory", "crash", "fuzz_error")
FAILURES = ("silent_wrong", "traceback", "hang", "memory", "crash", "fuzz_error")
# relative share of cases per format: predict runs a whole prediction, so it gets a few cases
WEIGHTS = {
    "h5ad": 1.0,
    "embeddings_h5": 1.0,
    "embeddings_pt": 1.0,
    "spaceranger": 1.0,
    "hest": 1.0,
    "gmt": 1.0,
    "metadata": 1.0,
    "run": 1.0,
    "authors": 1.0,
    "predict": 0.1,
    "wsi": 1.0,
}
FORMATS = tuple(WEIGHTS)
BOMB_ROWS = 10**9  # declared rows of a size-bomb dataset (no data is ever written)
MAX_EXAMPLES = 20  # examples kept per failing (format, outcome, exception type)


# --- seeds --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seeds:
    """Valid inputs of every format, written once; cases copy what they mutate."""

    root: Path

    @property
    def cohort(self) -> Path:
        return self.root / "cohort"

    @property
    def h5ad(self) -> Path:
        return self.cohort / "st" / f"{SAMPLE}.h5ad"

    @property
    def embeddings_h5(self) -> tuple[Path, ...]:
        return (self.cohort / "embeddings" / ENCODER / f"{SAMPLE}.h5", self.root / "trident.h5")

    @property
    def embeddings_pt(self) -> tuple[Path, ...]:
        return (self.root / "dict_embeddings.pt", self.root / "list_embeddings.pt")

    @property
    def spaceranger(self) -> tuple[Path, ...]:
        return tuple(self.root / "spaceranger" / v for v in ("csv", "list", "parquet"))

    @property
    def hest(self) -> Path:
        return self.root / "patches.h5"

    @property
    def hest_metadata(self) -> Path:
        return self.root / "hest_metadata.json"

    @property
    def gmt(self) -> Path:
        return self.root / "sets.gmt"

    @property
    def authors(self) -> Path:
        return self.root / "authors"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def wsi(self) -> tuple[Path, ...]:
        return tuple(
            self.root / "wsi" / n for n in ("tiled.tif", "strips.tif", "ome.tif", "he.png")
        )

    def genes(self) -> list[str]:
        """The cohort's genes: the authors' checkpoint predicts these."""
        return json.loads((self.root / "genes.json").read_text())


def build_seeds(root: Path) -> Seeds:
    """Write one valid input of every format under ``root`` (about 2 s)."""
    import anndata as ad

    from histoprism.synthetic.cohort import make_cohort, tiny

    seeds = Seeds(Path(root))
    seeds.root.mkdir(parents=True, exist_ok=True)
    cfg = replace(tiny(), n_slides=4, spots=(40, 60), n_genes=60, targeted_genes=20)
    make_cohort(seeds.cohort, config=cfg)
    shutil.rmtree(seeds.cohort / "ceiling")  # synthetic truth: no reader of ours reads it
    st = ad.read_h5ad(seeds.h5ad)
    (seeds.root / "genes.json").write_text(json.dumps(list(st.var_names)))
    _seed_trident(seeds)
    _seed_torch_embeddings(seeds)
    for variant, folder in zip(("csv", "list", "parquet"), seeds.spaceranger, strict=True):
        _seed_spaceranger(folder, st, variant)
    _seed_hest(seeds, st)
    _seed_gmt(seeds, list(st.var_names))
    _seed_authors(seeds)
    _seed_wsi(seeds)
    return seeds


def _seed_trident(seeds: Seeds) -> None:
    """TRIDENT/CLAM layout: features, top-left coords with patch_size_level0, no barcodes."""
    import h5py

    with (
        h5py.File(seeds.embeddings_h5[0], "r") as src,
        h5py.File(seeds.embeddings_h5[1], "w") as h5,
    ):
        h5.create_dataset("features", data=src["features"][...])
        ds = h5.create_dataset("coords", data=np.rint(src["coords"][...] - 112).astype(np.int64))
        ds.attrs["patch_size_level0"] = 224


def _seed_torch_embeddings(seeds: Seeds) -> None:
    """The HistoPrism repository's ``.pt``: {barcode: (D,)} and {embeddings, barcodes}."""
    import torch

    from histoprism.io.readers import read_embeddings

    emb = read_embeddings(seeds.embeddings_h5[0])
    feats = torch.from_numpy(emb.features)
    barcodes = [str(b) for b in emb.barcodes]
    torch.save(dict(zip(barcodes, feats.unbind(0), strict=True)), seeds.embeddings_pt[0])
    torch.save({"embeddings": feats, "barcodes": barcodes}, seeds.embeddings_pt[1])


def _seed_spaceranger(outs: Path, st, variant: str) -> None:
    """A 10x ``outs/`` folder holding the slide's counts, plus an antibody and 3 spots off tissue."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    n = st.n_obs
    counts = sp.csc_matrix(np.vstack([st.X.toarray().T, np.ones((1, n))]).astype(np.int32))
    ids = [*st.var["gene_ids"], "CD3_TotalSeqB"]
    names = [*st.var_names, "CD3"]
    ftype = ["Gene Expression"] * st.n_vars + ["Antibody Capture"]
    (outs / "spatial").mkdir(parents=True)
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as h5:
        m = h5.create_group("matrix")
        m.create_dataset("data", data=counts.data)
        m.create_dataset("indices", data=counts.indices.astype(np.int64))
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(counts.shape, dtype=np.int32))
        m.create_dataset("barcodes", data=np.array(st.obs_names, dtype="S"))
        f = m.create_group("features")
        f.create_dataset("id", data=np.array(ids, dtype="S"))
        f.create_dataset("name", data=np.array(names, dtype="S"))
        f.create_dataset("feature_type", data=np.array(ftype, dtype="S"))
    obs = st.obs
    pos = pd.DataFrame(
        {
            "barcode": obs.index,
            "in_tissue": [1] * (n - 3) + [0] * 3,
            "array_row": obs["array_row"].to_numpy(),
            "array_col": obs["array_col"].to_numpy(),
            "pxl_row_in_fullres": np.rint(st.obsm["spatial"][:, 1]).astype(int),
            "pxl_col_in_fullres": np.rint(st.obsm["spatial"][:, 0]).astype(int),
        }
    )
    spatial = outs / "spatial"
    if variant == "csv":
        pos.to_csv(spatial / "tissue_positions.csv", index=False)
    elif variant == "list":
        pos.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    else:
        pos.to_parquet(spatial / "tissue_positions.parquet", index=False)
    scale = {
        "spot_diameter_fullres": 110.0,
        "tissue_hires_scalef": 0.1,
        "tissue_lowres_scalef": 0.03,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scale))


def _seed_hest(seeds: Seeds, st) -> None:
    from histoprism.io.readers.hest import write_hest_patches

    rng = np.random.default_rng(0)
    n, p = st.n_obs, 16
    img = rng.integers(0, 256, (n, p, p, 3), dtype=np.uint8)
    topleft = np.rint(st.obsm["spatial"]).astype(np.int64) - p // 2
    write_hest_patches(seeds.hest, img, topleft, np.asarray(st.obs_names), 0.5)
    meta = {  # as HEST writes metadata/{id}.json: Python's json, bare NaN where unknown
        "pixel_size_um_embedded": 0.2737,
        "pixel_size_um_estimated": math.nan,
        "organ": "Bowel",
        "st_technology": "Visium",
        "spots_under_tissue": n,
    }
    seeds.hest_metadata.write_text(json.dumps(meta))


def _seed_gmt(seeds: Seeds, genes: list[str]) -> None:
    lines = [f"SET_{i}\thttp://example.org/{i}\t" + "\t".join(genes[i::7]) for i in range(7)]
    seeds.gmt.write_text("\n".join(lines) + "\n")


def _seed_authors(seeds: Seeds) -> None:
    """The authors' LOG_DIR at a small size (32-d, hidden 32, 2 layers), imported into ``run/``."""
    import torch
    import yaml

    from histoprism.integrations.authors import cancer_codes, expected_shapes, import_checkpoint
    from histoprism.integrations.published import paper_settings
    from histoprism.models.network import ModelConfig
    from histoprism.training.recipes import PRESETS

    genes = seeds.genes()
    settings = dict(paper_settings(0), transformer_heads=4, hidden_dim=32)
    cfg = ModelConfig(
        **{
            **PRESETS["paper"][0],
            **dict(
                in_dim=32, n_genes=len(genes), n_conditions=len(cancer_codes()), hidden=32,
                n_layers=2, n_heads=4, cross_heads=4, ff_mult=2,
            ),
        }
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (torch.ones(s) if k.endswith("norm.weight") else 0.1 * torch.randn(s, generator=gen))
        for k, s in expected_shapes(cfg).items()
    }
    state["img_conv.gconv.lin.weight"] = torch.zeros(32, 32)  # the unused graph convolution
    state["img_norm.weight"] = torch.ones(32)
    (seeds.authors / "ckpt").mkdir(parents=True)
    (seeds.authors / "config.yml").write_text(yaml.safe_dump(settings))
    ckpt = dict(epoch=3, model_state=state, optimizer_state={}, best_val_loss=0.5)
    torch.save(ckpt, seeds.authors / "ckpt" / "best_model.pt")
    import_checkpoint(seeds.authors, seeds.run, encoder=ENCODER, genes=genes)


def _seed_wsi(seeds: Seeds) -> None:
    """A tiled TIFF (OpenSlide), a stripped TIFF (tifffile), an OME-TIFF pyramid and a PNG."""
    import tifffile
    from PIL import Image

    tiled, strips, ome, png = seeds.wsi
    tiled.parent.mkdir(parents=True)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    res = dict(resolution=(20000, 20000), resolutionunit="CENTIMETER")  # 0.5 µm/px
    tifffile.imwrite(tiled, image, photometric="rgb", tile=(64, 64), **res)
    tifffile.imwrite(strips, image, photometric="rgb", **res)
    with tifffile.TiffWriter(ome, ome=True) as tif:
        opts = dict(photometric="rgb", tile=(64, 64), compression="zlib")
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        tif.write(image, subifds=1, metadata=meta, **opts)
        tif.write(image[::2, ::2], subfiletype=1, **opts)
    Image.fromarray(image).save(png)


# --- binary mutations -----------------------------------------------------------------------------
Mutator = Callable[[Path, np.random.Generator], str]
_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_\-]{3,}")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def flip_bytes(path: Path, rng: np.random.Generator) -> str:
    """XOR 1-8 bytes: half within the first 4 KiB (superblock, zip/TIFF/PNG headers)."""
    data = bytearray(path.read_bytes())
    if not data:
        return "flip: empty file"
    offsets = []
    for _ in range(int(rng.integers(1, 9))):
        top = min(len(data), 4096) if rng.random() < 0.5 else len(data)
        off = int(rng.integers(top))
        data[off] ^= int(rng.integers(1, 256))
        offsets.append(off)
    path.write_bytes(bytes(data))
    return f"flip bytes at {offsets}"


def flip_near_name(path: Path, rng: np.random.Generator) -> str:
    """Flip bytes within 64 bytes of a stored name (an HDF5 link, attribute or object header)."""
    data = bytearray(path.read_bytes())
    names = list(_NAME.finditer(bytes(data)))
    if not names:
        return flip_bytes(path, rng)
    hit = _pick(rng, names)
    offsets = []
    for _ in range(int(rng.integers(1, 5))):
        off = min(max(hit.start() + int(rng.integers(-64, 64)), 0), len(data) - 1)
        data[off] ^= int(rng.integers(1, 256))
        offsets.append(off)
    path.write_bytes(bytes(data))
    return f"flip bytes at {offsets} near {hit.group().decode(errors='replace')!r}"


def truncate(path: Path, rng: np.random.Generator) -> str:
    data = path.read_bytes()
    keep = int(rng.integers(len(data))) if len(data) and rng.random() < 0.7 else 0
    if data and rng.random() < 0.3:
        keep = int(rng.integers(min(len(data), 4096)))  # inside the header
    path.write_bytes(data[:keep])
    return f"truncate to {keep} of {len(data)} bytes"


def append_garbage(path: Path, rng: np.random.Generator) -> str:
    extra = rng.integers(0, 256, int(rng.integers(1, 4097)), dtype=np.uint8).tobytes()
    with path.open("ab") as f:
        f.write(extra)
    return f"append {len(extra)} random bytes"


def zero_block(path: Path, rng: np.random.Generator) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return "zero: empty file"
    size = int(rng.integers(16, 4097))
    off = int(rng.integers(len(data)))
    data[off : off + size] = bytes(len(data[off : off + size]))
    path.write_bytes(bytes(data))
    return f"zero {size} bytes at {off}"


def random_file(path: Path, rng: np.random.Generator) -> str:
    size = int(_pick(rng, [0, 1, 8, 512, 4096]))
    path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return f"replace with {size} random bytes"


BINARY: tuple[tuple[Mutator, float], ...] = (
    (flip_bytes, 4),
    (flip_near_name, 3),
    (truncate, 2),
    (append_garbage, 1),
    (zero_block, 1),
    (random_file, 0.5),
)


def _weighted(rng: np.random.Generator, options: tuple[tuple[Mutator, float], ...]) -> Mutator:
    w = np.array([x[1] for x in options], dtype=float)
    return options[int(rng.choice(len(options), p=w / w.sum()))][0]


def binary(path: Path, rng: np.random.Generator) -> str:
    return _weighted(rng, BINARY)(path, rng)


# --- HDF5 structure -------------------------------------------------------------------------------
def _h5_objects(h5) -> tuple[list[str], list[str]]:
    """(dataset names, group names incl. '/') of an open file."""
    import h5py

    datasets, groups = [], ["/"]

    def visit(name, obj):
        (datasets if isinstance(obj, h5py.Dataset) else groups).append(name)

    h5.visititems(visit)
    return datasets, groups


def _replace(h5, name: str, data=None, *, keep_dtype: bool = False, **create) -> None:
    """Recreate dataset ``name`` (attributes kept) with new data or creation arguments."""
    attrs = dict(h5[name].attrs)
    if keep_dtype:
        create["dtype"] = h5[name].dtype
    del h5[name]
    ds = h5.create_dataset(name, data=data, **create)
    for k, v in attrs.items():
        ds.attrs[k] = v


def _is_text(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "SUO"


def _as_bytes(arr: np.ndarray) -> np.ndarray:
    flat = [x if isinstance(x, bytes) else str(x).encode() for x in arr.reshape(-1)]
    return np.array(flat, dtype=object).reshape(arr.shape)


def h5_drop(h5, name, rng) -> str:
    del h5[name]
    return f"h5: drop {name}"


def h5_rename(h5, name, rng) -> str:
    h5.move(name, name + "_renamed")
    return f"h5: rename {name}"


def h5_group(h5, name, rng) -> str:
    del h5[name]
    h5.create_group(name)
    return f"h5: {name} is an empty group"


def h5_link(h5, name, rng) -> str:
    import h5py

    del h5[name]
    if rng.random() < 0.5:
        h5[name] = h5py.SoftLink("/no/such/object")
        return f"h5: {name} is a dangling soft link"
    h5[name] = h5py.ExternalLink("missing_file.h5", "/x")
    return f"h5: {name} is an external link to a missing file"


def h5_retype(h5, name, rng) -> str:
    import h5py

    arr = h5[name][()]
    arr = np.asarray(arr)
    if _is_text(arr):
        target = _pick(rng, ["int64", "float32", "float64", "bool", "complex64"])
        new = rng.integers(-5, 5, arr.shape).astype(target)
    else:
        target = _pick(
            rng, ["str", "bytes", "complex128", "int64", "int8", "uint8", "bool", "float16", "f8"]
        )
        if target == "str":
            new = np.array([str(x) for x in arr.reshape(-1)], dtype=object).reshape(arr.shape)
            _replace(h5, name, new, dtype=h5py.string_dtype())
            return f"h5: {name} as variable-length str"
        if target == "bytes":
            new = np.array([str(x).encode() for x in arr.reshape(-1)]).reshape(arr.shape)
        else:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = arr.astype(target)
    _replace(h5, name, new)
    return f"h5: {name} as {target}"


def h5_reshape(h5, name, rng) -> str:
    arr = np.asarray(h5[name][()])
    how = _pick(rng, ["fewer", "more", "transpose", "add_axis", "flatten", "scalar", "empty", "3d"])
    if arr.ndim == 0 and how not in ("add_axis", "3d"):
        how = "add_axis"
    if how == "fewer":
        new = arr[:-1]
    elif how == "more":
        new = np.concatenate([arr, arr[-1:]]) if len(arr) else arr
    elif how == "transpose":
        new = arr.T if arr.ndim >= 2 else arr[None, :]
    elif how == "add_axis":
        new = arr[..., None]
    elif how == "flatten":
        new = arr.reshape(-1)
    elif how == "scalar":
        new = arr.reshape(-1)[0] if arr.size else np.zeros((), arr.dtype)
    elif how == "empty":
        new = arr[:0]
    else:
        new = np.stack([arr, arr], axis=-1)
    if _is_text(arr):  # as fixed-length bytes: h5py stores no object arrays without a dtype
        new = _as_bytes(np.asarray(new, dtype=object)).astype("S")
    _replace(h5, name, new)
    return f"h5: {name} {how} {arr.shape} -> {np.shape(new)}"


def h5_values(h5, name, rng) -> str:
    arr = np.array(h5[name][()])
    if _is_text(arr) or arr.size == 0:
        return h5_duplicate(h5, name, rng)
    if arr.dtype.kind in "fc":
        value = _pick(rng, [np.nan, np.inf, -np.inf, 1e38, -1e38, -1.0, 0.0, 1e-45])
    elif arr.dtype.kind == "b":
        value = False
    else:
        info = np.iinfo(arr.dtype)
        value = _pick(rng, [-1, 0, info.max, info.min, 2**31 - 1])
    flat = arr.reshape(-1)
    where = rng.integers(flat.size, size=int(rng.integers(1, 4))) if rng.random() < 0.8 else ...
    with np.errstate(all="ignore"):
        flat[where] = np.array(value).astype(arr.dtype)
    h5[name][...] = flat.reshape(arr.shape)
    return f"h5: {name}[{'all' if where is ... else list(map(int, where))}] = {value}"


def h5_bomb(h5, name, rng) -> str:
    """Declare (10**9, ...) rows with no data written: chunked, or a virtual dataset over nothing."""
    import h5py

    ds = h5[name]
    rest, dtype = ds.shape[1:], ds.dtype
    shape = (BOMB_ROWS, *rest)
    attrs = dict(ds.attrs)
    del h5[name]
    if rng.random() < 0.5:
        chunks = (4096, *(max(d, 1) for d in rest))
        new = h5.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
        kind = "chunked"
    else:
        new = h5.create_virtual_dataset(name, h5py.VirtualLayout(shape=shape, dtype=dtype))
        kind = "virtual"
    for k, v in attrs.items():
        new.attrs[k] = v
    return f"h5: {name} declared {shape} {dtype} ({kind}, no data written)"


def h5_duplicate(h5, name, rng) -> str:
    arr = np.array(h5[name][()])
    if arr.ndim == 0 or len(arr) < 2:
        return h5_reshape(h5, name, rng)
    arr[1] = arr[0]
    _replace(h5, name, arr, keep_dtype=True)
    return f"h5: {name}[1] = {name}[0]"


def h5_bad_utf8(h5, name, rng) -> str:
    import h5py

    arr = np.array(h5[name][()])
    if not _is_text(arr) or arr.size == 0:
        return h5_retype(h5, name, rng)
    flat = list(_as_bytes(arr).reshape(-1))
    flat[int(rng.integers(len(flat)))] = b"\xff\xfe\xc3("
    if rng.random() < 0.5:
        _replace(h5, name, np.array(flat, dtype="S").reshape(arr.shape))
        return f"h5: invalid UTF-8 in {name} (fixed-length bytes)"
    data = np.array(flat, dtype=object).reshape(arr.shape)
    _replace(h5, name, data, dtype=h5py.string_dtype("utf-8"))
    return f"h5: invalid UTF-8 in {name} (variable-length, labelled UTF-8)"


ATTR_VALUES = (
    ("NaN", np.nan),
    ("inf", np.inf),
    ("str", "garbage"),
    ("empty str", ""),
    ("array", np.array([1, 2, 3])),
    ("huge shape", np.array([BOMB_ROWS, BOMB_ROWS])),
    ("-1", -1),
    ("0", 0),
    ("1e300", 1e300),
    ("bad utf-8", np.bytes_(b"\xff\xfe")),
)
KNOWN_ATTRS = (
    "patch_size_level0",
    "pixel_size",
    "encoding-type",
    "encoding-version",
    "shape",
    "coords_are",
    "patch_size",
)


def h5_attr(h5, groups: list[str], datasets: list[str], rng) -> str:
    """Set, add or delete an attribute (anndata's encoding-type and shape, pixel_size ...)."""
    owners = [(o, a) for o in ["/", *datasets, *groups] for a in h5[o].attrs]
    label, value = _pick(rng, ATTR_VALUES)
    if owners and rng.random() < 0.75:
        owner, attr = _pick(rng, owners)
        if rng.random() < 0.2:
            del h5[owner].attrs[attr]
            return f"h5: delete attr {owner}@{attr}"
    else:
        owner, attr = _pick(rng, ["/", *datasets, *groups]), _pick(rng, KNOWN_ATTRS)
    h5[owner].attrs[attr] = value
    return f"h5: attr {owner}@{attr} = {label}"


H5_OPS = (
    (h5_drop, 2),
    (h5_rename, 1),
    (h5_group, 1),
    (h5_link, 1),
    (h5_retype, 3),
    (h5_reshape, 3),
    (h5_values, 3),
    (h5_bomb, 2),
    (h5_duplicate, 2),
    (h5_bad_utf8, 2),
)


def hdf5(path: Path, rng: np.random.Generator) -> str:
    """One structural change through h5py, on a random dataset (or attribute)."""
    import h5py

    with h5py.File(path, "r+") as h5:
        datasets, groups = _h5_objects(h5)
        if not datasets or rng.random() < 0.15:
            return h5_attr(h5, groups, datasets, rng)
        op = _weighted(rng, H5_OPS)
        return op(h5, _pick(rng, datasets), rng)


def hdf5_or_binary(path: Path, rng: np.random.Generator) -> str:
    return hdf5(path, rng) if rng.random() < 0.7 else binary(path, rng)


# --- text -----------------------------------------------------------------------------------------
NA_TOKENS = ("NA", "", "NaN", "None", "null", "#N/A", " ", "<NA>", "N/A")
ODD_TOKENS = ("-1", "0", "1e308", "inf", "-inf", "abc", "1.5", '"', "'", "é", "\x00", "0x10")


def text(path: Path, rng: np.random.Generator, sep: str = ",") -> str:
    """One text mutation of a CSV/GMT/YAML/JSON file (lines split on ``sep`` into fields)."""
    raw = path.read_bytes()
    s = raw.decode("utf-8", errors="surrogateescape")
    lines = s.splitlines()
    op = _pick(
        rng,
        [
            "delete_line", "duplicate_line", "swap_lines", "empty", "header_only", "whitespace",
            "binary", "nul", "utf16", "latin1", "bom", "bad_utf8", "quote", "long_line",
            "long_field", "na_field", "na_first", "odd_field", "delimiter", "crlf",
            "drop_column", "duplicate_column", "truncate_mid", "blank_lines", "extra_field",
        ],
    )  # fmt: skip
    out: bytes | str
    i = int(rng.integers(len(lines))) if lines else 0
    if op == "delete_line" and lines:
        out = "\n".join(lines[:i] + lines[i + 1 :]) + "\n"
    elif op == "duplicate_line" and lines:
        out = "\n".join(lines[: i + 1] + lines[i:]) + "\n"
    elif op == "swap_lines" and len(lines) > 1:
        j = int(rng.integers(len(lines)))
        lines[i], lines[j] = lines[j], lines[i]
        out = "\n".join(lines) + "\n"
    elif op == "empty":
        out = b""
    elif op == "header_only":
        out = (lines[0] + "\n") if lines else ""
    elif op == "whitespace":
        out = " \n\t\n  \n"
    elif op == "binary":
        out = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
    elif op == "nul":
        at = int(rng.integers(len(raw) + 1))
        out = raw[:at] + b"\x00" * int(rng.integers(1, 9)) + raw[at:]
    elif op == "utf16":
        out = (s.replace("a", "é", 1) if "a" in s else s).encode("utf-16", errors="surrogatepass")
    elif op == "latin1":
        out = s.replace("a", "é", 1).encode("latin-1", errors="replace")
    elif op == "bom":
        out = b"\xef\xbb\xbf" + raw
    elif op == "bad_utf8":
        at = int(rng.integers(len(raw) + 1))
        out = raw[:at] + b"\xff\xfe\xc3(" + raw[at:]
    elif op == "quote":
        at = int(rng.integers(len(s) + 1))
        out = s[:at] + '"' + s[at:]
    elif op == "long_line":
        out = s + ("x" * 10**6 if rng.random() < 0.5 else sep.join(["7"] * 200_000)) + "\n"
    elif op in ("long_field", "na_field", "odd_field", "na_first") and lines:
        fields = lines[i].split(sep)
        k = 0 if op == "na_first" else int(rng.integers(len(fields)))
        fields[k] = {
            "long_field": "g" * 10**5,
            "na_field": _pick(rng, NA_TOKENS),
            "na_first": _pick(rng, NA_TOKENS),
            "odd_field": _pick(rng, ODD_TOKENS),
        }[op]
        lines[i] = sep.join(fields)
        out = "\n".join(lines) + "\n"
    elif op == "delimiter":
        out = s.replace(sep, _pick(rng, [";", "\t" if sep != "\t" else ",", " ", "|"]))
    elif op == "crlf":
        out = s.replace("\n", "\r\n") if rng.random() < 0.5 else s.replace("\n", "\r")
    elif op == "drop_column" and lines:
        k = int(rng.integers(max(len(line.split(sep)) for line in lines)))
        out = "\n".join(sep.join(f for j, f in enumerate(x.split(sep)) if j != k) for x in lines)
    elif op == "duplicate_column" and lines:
        fields = lines[0].split(sep)
        lines[0] = sep.join([*fields, fields[int(rng.integers(len(fields)))]])
        out = "\n".join(lines) + "\n"
    elif op == "truncate_mid":
        out = raw[: int(rng.integers(len(raw) + 1))]
    elif op == "blank_lines":
        out = "\n\n" + "\n\n".join(lines) + "\n\n"
    elif op == "extra_field" and lines:
        lines[i] = lines[i] + sep + "extra" + sep
        out = "\n".join(lines) + "\n"
    else:
        out = b""
        op = f"{op} (nothing to change: empty)"
    path.write_bytes(out if isinstance(out, bytes) else out.encode("utf-8", "surrogateescape"))
    return f"text: {op}" + (f" (line {i + 1})" if "line" in op or "field" in op else "")


def text_or_binary(sep: str) -> Mutator:
    def mutate(path: Path, rng: np.random.Generator) -> str:
        return text(path, rng, sep) if rng.random() < 0.85 else binary(path, rng)

    return mutate


# --- JSON / YAML structure ------------------------------------------------------------------------
JSON_VALUES = (
    ("null", None),
    ("str", "x"),
    ("empty list", []),
    ("empty dict", {}),
    ("-1", -1),
    ("0", 0),
    ("1e308", 1e308),
    ("NaN", math.nan),
    ("10**30", 10**30),
    ("true", True),
    ("list of str", ["a", "a"]),
    ("dict", {"a": 1}),
)


def _paths(obj, prefix=()) -> Iterator[tuple]:
    """Every key path of a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):  # a 60-gene list: any 50 are as good
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def structure(obj, rng: np.random.Generator) -> tuple[object, str]:
    """One change of a parsed JSON/YAML document: delete a key, change a value's type ..."""
    paths = list(_paths(obj))
    if not paths or rng.random() < 0.08:
        label, value = _pick(rng, JSON_VALUES + (("list", [1, 2]),))
        return value, f"document is {label}"
    where = _pick(rng, paths)
    parent = obj
    for k in where[:-1]:
        parent = parent[k]
    key = where[-1]
    if rng.random() < 0.25:
        del parent[key]
        return obj, f"delete {'.'.join(map(str, where))}"
    label, value = _pick(rng, JSON_VALUES)
    parent[key] = value
    return obj, f"{'.'.join(map(str, where))} = {label}"


def json_doc(path: Path, rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.15:
        return text(path, rng, ",")
    if r < 0.2:
        return binary(path, rng)
    if r < 0.25:
        depth = 100_000
        path.write_text("[" * depth + "]" * depth)
        return f"json: nested {depth} deep"
    obj, what = structure(json.loads(path.read_text()), rng)
    path.write_text(json.dumps(obj))
    return f"json: {what}"


# 9 levels of 10 aliases: 10**9 leaves once expanded (PyYAML itself shares the objects)
YAML_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
)


def yaml_doc(path: Path, rng: np.random.Generator) -> str:
    import yaml

    r = rng.random()
    if r < 0.2:
        return text(path, rng, ": ")
    if r < 0.25:
        return binary(path, rng)
    if r < 0.3:
        path.write_text(path.read_text() + YAML_BOMB + "\n")
        return "yaml: alias bomb (10**9 leaves when expanded) added"
    if r < 0.33:
        path.write_text("!!python/object/apply:os.system ['true']\n")
        return "yaml: python object tag"
    if r < 0.36:
        path.write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
        return "yaml: nested 50,000 deep"
    obj, what = structure(yaml.safe_load(path.read_text()), rng)
    path.write_text(yaml.safe_dump(obj))
    return f"yaml: {what}"


# --- torch .pt structure --------------------------------------------------------------------------
def _tensor_variant(t, rng) -> tuple[object, str]:
    """A changed tensor (or a non-tensor) in place of ``t``."""
    import fractions

    import torch

    how = _pick(
        rng,
        [
            "nan", "inf", "int64", "bool", "complex", "float16", "2d", "transpose", "scalar",
            "empty", "shorter", "list", "str", "none", "int", "object", "huge_values",
        ],
    )  # fmt: skip
    if how == "nan":
        t = t.clone().float()
        t.view(-1)[int(rng.integers(max(t.numel(), 1)))] = float("nan") if t.numel() else 0
    elif how == "inf":
        t = t.clone().float()
        if t.numel():
            t.view(-1)[0] = float("inf")
    elif how == "huge_values":
        t = t.clone().float().fill_(1e38)
    elif how == "int64":
        t = t.long()
    elif how == "bool":
        t = t.bool()
    elif how == "complex":
        t = t.to(torch.complex64)
    elif how == "float16":
        t = t.half()
    elif how == "2d":
        t = t.reshape(1, *t.shape)
    elif how == "transpose":
        t = t.T if t.dim() == 2 else t.reshape(-1, 1)
    elif how == "scalar":
        t = t.reshape(-1)[0].clone() if t.numel() else torch.tensor(0.0)
    elif how == "empty":
        t = t[:0]
    elif how == "shorter":
        t = t[:-1] if t.dim() else t
    elif how == "list":
        t = t.tolist()
    elif how == "str":
        t = "tensor"
    elif how == "none":
        t = None
    elif how == "int":
        t = 7
    else:
        t = fractions.Fraction(1, 3)  # only full unpickling rebuilds it: weights_only refuses
    return t, how


def torch_embeddings(path: Path, rng: np.random.Generator) -> str:
    """Change the loaded {barcode: tensor} / {embeddings, barcodes} object and save it again."""
    import torch

    if rng.random() < 0.3:
        return binary(path, rng)
    obj = torch.load(path, weights_only=True)
    how = _pick(
        rng, ["value", "value", "key_int", "key_bad_utf8", "dup_barcode", "fewer_barcodes",
              "top_list", "top_empty", "embeddings_value", "drop_embeddings"],
    )  # fmt: skip
    if "barcodes" in obj:
        if how == "dup_barcode":
            obj["barcodes"][1] = obj["barcodes"][0]
        elif how == "fewer_barcodes":
            obj["barcodes"] = obj["barcodes"][:-1]
        elif how == "key_bad_utf8":
            obj["barcodes"][0] = b"\xff\xfe"
        elif how == "key_int":
            obj["barcodes"][0] = 17
        elif how == "drop_embeddings":
            del obj["embeddings"]
        elif how in ("value", "embeddings_value"):
            obj["embeddings"], what = _tensor_variant(obj["embeddings"], rng)
            how = f"embeddings {what}"
    else:
        keys = list(obj)
        if how in ("value", "embeddings_value"):
            k = _pick(rng, keys)
            obj[k], what = _tensor_variant(obj[k], rng)
            how = f"value of {k}: {what}"
        elif how == "key_int":
            obj[17] = obj.pop(keys[0])
        elif how == "key_bad_utf8":
            obj[b"\xff\xfe"] = obj.pop(keys[0])
        elif how == "dup_barcode":
            obj[keys[0].encode()] = obj[keys[0]]  # the same barcode as str and as bytes
        elif how == "fewer_barcodes":
            obj = {"barcodes": keys[:-1], "embeddings": torch.stack(list(obj.values()))}
    if how == "top_list":
        obj = list(obj.values()) if isinstance(obj, dict) else obj
    elif how == "top_empty":
        obj = {}
    torch.save(obj, path)
    return f"pt: {how}"


def torch_checkpoint(path: Path, rng: np.random.Generator) -> str:
    """Change the authors' ``best_model.pt``: its model_state's keys, shapes, dtypes, values."""
    import torch

    if rng.random() < 0.3:
        return binary(path, rng)
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["model_state"]
    how = _pick(
        rng, ["tensor", "tensor", "tensor", "drop", "extra", "module_prefix", "part_prefix",
              "no_state", "state_list", "epoch", "loss", "top_list"],
    )  # fmt: skip
    key = _pick(rng, list(state))
    if how == "tensor":
        state[key], what = _tensor_variant(state[key], rng)
        how = f"model_state[{key}]: {what}"
    elif how == "drop":
        del state[key]
        how = f"drop {key}"
    elif how == "extra":
        state["transformer.layers.7.linear1.weight"] = torch.zeros(3, 3)
    elif how == "module_prefix":
        ckpt["model_state"] = {f"module.{k}": v for k, v in state.items()}
    elif how == "part_prefix":
        state[f"module.{key}"] = state.pop(key)
    elif how == "no_state":
        del ckpt["model_state"]
    elif how == "state_list":
        ckpt["model_state"] = list(state.values())
    elif how == "epoch":
        ckpt["epoch"] = _pick(rng, ["x", [1, 2], torch.zeros(3), float("nan"), 10**30])
        how = f"epoch = {type(ckpt['epoch']).__name__}"
    elif how == "loss":
        ckpt["best_val_loss"] = _pick(rng, ["x", [1.0], torch.zeros(2), float("inf"), None])
        how = f"best_val_loss = {type(ckpt['best_val_loss']).__name__}"
    else:
        ckpt = [ckpt]
    torch.save(ckpt, path)
    return f"pt: {how}"


# --- safetensors ----------------------------------------------------------------------------------
def safetensors(path: Path, rng: np.random.Generator) -> str:
    """Change the JSON header of a safetensors file (dtype, shape, offsets, names), its length
    field, or write NaN into one float tensor's bytes."""
    if rng.random() < 0.3:
        return binary(path, rng)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    name = _pick(rng, names)
    entry = header[name]
    how = _pick(
        rng, ["dtype", "shape", "bomb_shape", "offsets", "drop", "rename", "length", "nan",
              "metadata", "header_list"],
    )  # fmt: skip
    if how == "nan" and entry["dtype"] != "F32":
        how = "dtype"
    if how == "length":
        value = _pick(rng, [2**40, n + 1, 0, len(raw)])
        path.write_bytes(struct.pack("<Q", value) + raw[8:])
        return f"safetensors: header length {value} (file {len(raw)} bytes)"
    if how == "nan" and entry["dtype"] == "F32":
        start = entry["data_offsets"][0]
        buf = bytearray(data)
        buf[start : start + 4] = struct.pack("<f", math.nan)
        data = bytes(buf)
    elif how == "dtype":
        entry["dtype"] = _pick(rng, ["F64", "I8", "BOOL", "F16", "XX", "U64"])
    elif how == "shape":
        entry["shape"] = _pick(rng, [entry["shape"][::-1], [*entry["shape"], 1], [], [0]])
    elif how == "bomb_shape":
        entry["shape"] = [BOMB_ROWS, *entry["shape"][1:]]
    elif how == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = _pick(rng, [[b, a], [a, b + 4], [a, len(data) + 64], [a, a]])
    elif how == "drop":
        del header[name]
    elif how == "rename":
        header[name + "_x"] = header.pop(name)
    elif how == "metadata":
        header["__metadata__"] = {"format": 7}
    else:
        header = [header]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return f"safetensors: {how} of {name}"


# --- formats ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A mutated input ready to read: what the reader is given, and what was changed."""

    target: Path
    mutation: str


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def _mutate_one(rng, options: list[tuple[Path, Mutator, float]]) -> str:
    """Mutate one of several files of a folder, chosen by weight."""
    w = np.array([o[2] for o in options])
    path, mutator, _ = options[int(rng.choice(len(options), p=w / w.sum()))]
    if not path.exists():
        return f"{path.name}: absent"
    return f"{path.name}: {mutator(path, rng)}"


def _delete_one(rng, paths: list[Path]) -> str:
    path = _pick(rng, [p for p in paths if p.exists()])
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return f"delete {path.name}"


def prepare(fmt: str, seeds: Seeds, case: Path, rng: np.random.Generator) -> Prepared:
    """Copy a seed of ``fmt`` into ``case`` and mutate it."""
    if fmt == "h5ad":
        target = _copy(seeds.h5ad, case / "st" / "s.h5ad")
        return Prepared(target, hdf5_or_binary(target, rng))
    if fmt == "embeddings_h5":
        seed = _pick(rng, seeds.embeddings_h5)
        target = _copy(seed, case / "e.h5")
        return Prepared(target, f"{seed.stem}: {hdf5_or_binary(target, rng)}")
    if fmt == "embeddings_pt":
        seed = _pick(rng, seeds.embeddings_pt)
        target = _copy(seed, case / "s_embeddings.pt")
        return Prepared(target, f"{seed.stem}: {torch_embeddings(target, rng)}")
    if fmt == "spaceranger":
        seed = _pick(rng, seeds.spaceranger)
        outs = _copy(seed, case / "outs")
        sp = outs / "spatial"
        pos = next(p for p in sp.iterdir() if p.name.startswith("tissue_positions"))
        pos_mut = binary if pos.suffix == ".parquet" else text_or_binary(",")
        options = [
            (outs / "filtered_feature_bc_matrix.h5", hdf5_or_binary, 5),
            (pos, pos_mut, 3),
            (sp / "scalefactors_json.json", json_doc, 1),
        ]
        if rng.random() < 0.07:
            what = _delete_one(rng, [o[0] for o in options] + [sp])
        else:
            what = _mutate_one(rng, options)
        return Prepared(outs, f"{seed.name}: {what}")
    if fmt == "hest":
        if rng.random() < 0.2:  # the sample's metadata/{id}.json
            target = _copy(seeds.hest_metadata, case / "metadata.json")
            return Prepared(target, f"metadata.json: {json_doc(target, rng)}")
        target = _copy(seeds.hest, case / "patches.h5")
        return Prepared(target, hdf5_or_binary(target, rng))
    if fmt == "gmt":
        target = _copy(seeds.gmt, case / "sets.gmt")
        return Prepared(target, text_or_binary("\t")(target, rng))
    if fmt == "metadata":
        root = case / "cohort"
        _copy(seeds.cohort / "metadata.csv", root / "metadata.csv")
        _copy(seeds.cohort / "splits", root / "splits")
        (root / "st").mkdir()
        for p in (seeds.cohort / "st").glob("*.h5ad"):  # Cohort only lists them
            (root / "st" / p.name).touch()
        files = [root / "metadata.csv", *sorted((root / "splits").glob("*.csv"))]
        if rng.random() < 0.07:
            return Prepared(root, _delete_one(rng, [*files, root / "splits"]))
        options = [(files[0], text_or_binary(","), 3)] + [
            (f, text_or_binary(","), 1) for f in files[1:]
        ]
        return Prepared(root, _mutate_one(rng, options))
    if fmt == "run":
        run = _copy(seeds.run, case / "run")
        options = [(run / "config.json", json_doc, 1), (run / "model.safetensors", safetensors, 1)]
        if rng.random() < 0.05:
            return Prepared(run, _delete_one(rng, [o[0] for o in options]))
        return Prepared(run, _mutate_one(rng, options))
    if fmt == "authors":
        log_dir = _copy(seeds.authors, case / "log")
        options = [
            (log_dir / "config.yml", yaml_doc, 2),
            (log_dir / "ckpt" / "best_model.pt", torch_checkpoint, 3),
        ]
        if rng.random() < 0.05:
            return Prepared(log_dir, _delete_one(rng, [o[0] for o in options]))
        return Prepared(log_dir, _mutate_one(rng, options))
    if fmt == "predict":
        root = case / "cohort"
        shutil.copytree(seeds.cohort, root)
        meta = root / "metadata" / f"{SAMPLE}.json"  # HEST's sidecar, read for the pixel size
        meta.parent.mkdir()
        meta.write_text(json.dumps({"pixel_size_um_embedded": 0.5, "organ": "Breast"}))
        options = [
            (root / "st" / f"{SAMPLE}.h5ad", hdf5_or_binary, 3),
            (root / "embeddings" / ENCODER / f"{SAMPLE}.h5", hdf5_or_binary, 3),
            (root / "metadata.csv", text_or_binary(","), 2),
            (root / "splits" / "train_split.csv", text_or_binary(","), 1),
            (meta, json_doc, 1),
        ]
        return Prepared(root, _mutate_one(rng, options))
    if fmt == "wsi":
        seed = _pick(rng, seeds.wsi)
        target = _copy(seed, case / seed.name)
        return Prepared(target, f"{seed.name}: {binary(target, rng)}")
    raise ValueError(f"unknown format {fmt}")


# --- readers and invariants -----------------------------------------------------------------------
def _unique_str(values, what: str) -> list[str]:
    values = list(values)
    problems = []
    if not all(isinstance(v, str) for v in values):
        problems.append(f"{what} not all str")
    elif len(set(values)) != len(values):
        problems.append(f"{what} not unique")
    return problems


def _check_counts_adata(adata, *, int_coords: bool = False) -> list[str]:
    import scipy.sparse as sp

    problems = []
    X = adata.X
    if not sp.issparse(X) or X.format != "csr" or X.dtype != np.float32:
        problems.append(f"X is {type(X).__name__} {getattr(X, 'dtype', '?')}, not float32 CSR")
    elif X.shape != (adata.n_obs, adata.n_vars) or X.shape[0] == 0 or X.shape[1] == 0:
        problems.append(f"X shape {X.shape}")
    elif not np.isfinite(X.data).all() or (X.data < 0).any():
        problems.append("counts not finite and non-negative")
    else:
        try:
            X.check_format(full_check=True)
        except ValueError as exc:
            problems.append(f"X not a valid CSR matrix ({exc})")
    problems += _unique_str(adata.obs_names, "barcodes") + _unique_str(adata.var_names, "genes")
    xy = np.asarray(adata.obsm.get("spatial", np.zeros((0, 0))))
    if xy.ndim != 2 or xy.shape[0] != adata.n_obs or xy.shape[1] < 2:
        problems.append(f"obsm['spatial'] shape {xy.shape}")
    elif xy.dtype.kind not in "iuf" or not np.isfinite(xy[:, :2].astype(float)).all():
        problems.append("obsm['spatial'] not finite numbers")
    elif int_coords and xy.dtype != np.int64:
        problems.append(f"obsm['spatial'] dtype {xy.dtype}")
    return problems


def _check_embeddings(emb) -> list[str]:
    f, c = emb.features, emb.coords
    problems = []
    if f.ndim != 2 or f.dtype != np.float32 or f.shape[0] == 0 or f.shape[1] == 0:
        return [f"features {f.shape} {f.dtype}"]
    if not np.isfinite(f).all():
        problems.append("features not finite")
    if c.shape != (f.shape[0], 2) or c.dtype != np.float64:
        problems.append(f"coords {c.shape} {c.dtype}")
    else:
        finite = np.isfinite(c)
        # all NaN means "no coordinates" (a .pt file): then spots are matched by barcode
        if not (finite.all() or (not finite.any() and emb.barcodes is not None)):
            problems.append("coords partly NaN/inf")
    if emb.barcodes is not None:
        if len(emb.barcodes) != f.shape[0]:
            problems.append(f"{len(emb.barcodes)} barcodes for {f.shape[0]} rows")
        problems += _unique_str(emb.barcodes, "barcodes")
    return problems


def _check_run(run) -> list[str]:
    """Every weight finite, and one forward pass of 5 spots gives finite genes x spots."""
    import torch

    from histoprism.io.cohort import Slide
    from histoprism.io.rundir import load_run

    problems = []
    _, tensors = load_run(run.path)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        problems.append(f"non-finite weights: {bad[0]}")
    problems += _unique_str(run.panel.genes, "genes")
    if not run.vocab.codes:
        return [*problems, "no cancer codes"]
    rng = np.random.default_rng(0)
    in_dim = run.predictor.model.cfg.in_dim  # (the runs fuzzed here are all HistoPrism)
    slide = Slide(
        "probe",
        run.vocab.codes[0],
        np.array([f"b{i}" for i in range(5)]),
        rng.normal(size=(5, in_dim)).astype(np.float32),
        np.arange(10, dtype=np.float64).reshape(5, 2) * 100,
    )
    out = run.predictor.predict_genes(run.predictor.prepare(slide), slice(None))
    if out.shape != (5, len(run.panel)):
        problems.append(f"the model predicts {out.shape[1]} genes, the panel has {len(run.panel)}")
    elif not np.isfinite(out).all():
        problems.append("a forward pass gives NaN/inf")
    return problems


def _check_cohort(cohort) -> list[str]:
    problems = _unique_str(cohort.metadata.index, "sample ids")
    # 'nan' is what a missing value becomes as text: the NA tokens written below never are it,
    # so an id 'nan' means that 'NA', 'None', 'NaN' ... in the file was read as missing
    if any(not str(i).strip() or str(i) == "nan" for i in cohort.metadata.index):
        problems.append("empty sample id, or one read as missing (nan)")
    codes = [cohort.cancer(i) for i in cohort.metadata.index if isinstance(i, str)]
    if not all(isinstance(c, str) and c.strip() for c in codes):
        problems.append("empty cancer code")
    seen: dict[str, str] = {}
    for split, ids in cohort.splits.items():
        for i in ids:
            if not isinstance(i, str):
                problems.append(f"split {split} holds {type(i).__name__} id")
                break
            if seen.setdefault(i, split) != split:
                problems.append(f"sample {i} in splits {seen[i]} and {split}")
                break
    return problems


def _read_predict(root: Path, run: Path):
    """Predict the mutated slide of the cohort ``root`` with the (intact) run."""
    from histoprism.inference.predict import predict

    out = root.parent / "pred"
    return predict(run, root, ENCODER, out, samples=SAMPLE, images=False, progress=False)


def _check_predict(paths) -> list[str]:
    import anndata as ad

    problems = []
    for p in paths:
        a = ad.read_h5ad(p)
        X = np.asarray(a.X)
        if X.shape != (a.n_obs, a.n_vars) or a.n_obs == 0:
            problems.append(f"X shape {X.shape}")
        elif not np.isfinite(X).all() or (X < 0).any():
            problems.append("predictions not finite and >= 0")
        problems += _unique_str(a.obs_names, "barcodes")
        xy = np.asarray(a.obsm["spatial"])
        if xy.shape != (a.n_obs, 2) or not np.isfinite(xy).all():
            problems.append("obsm['spatial'] not finite (N, 2)")
    return problems


def _read_wsi(path: Path):
    from histoprism.io.readers.wsi import open_wsi

    with open_wsi(path, mpp=0.5 if path.suffix == ".png" else None) as wsi:
        region = wsi.read_region(16, 16, 0, 64, 48)
        thumb = wsi.thumbnail(64)
        return wsi.mpp, wsi.dimensions, region, thumb


def _check_wsi(result) -> list[str]:
    mpp, (w, h), region, thumb = result
    problems = []
    if not (math.isfinite(mpp) and mpp > 0):
        problems.append(f"mpp {mpp}")
    if w < 1 or h < 1:
        problems.append(f"dimensions {w} x {h}")
    if region.shape != (48, 64, 3) or region.dtype != np.uint8:
        problems.append(f"region {region.shape} {region.dtype}")
    if thumb.ndim != 3 or thumb.shape[2] != 3 or max(thumb.shape[:2]) > 65:
        problems.append(f"thumbnail {thumb.shape}")
    return problems


def _read_hest(path: Path):
    """A patch file and all its pixels, or a metadata JSON and the pixel size it gives."""
    from histoprism.io.readers.hest import hest_pixel_size, read_hest_metadata, read_hest_patches

    if path.suffix == ".json":
        meta = read_hest_metadata(path)
        return meta, hest_pixel_size(meta)
    hp = read_hest_patches(path)
    batches = [(rows, b) for rows, b in hp.iter_batches(16)]
    return hp, batches


def _check_hest(result) -> list[str]:
    if isinstance(result[0], dict):
        size = result[1]
        ok = size is None or (isinstance(size, float) and math.isfinite(size) and size > 0)
        return [] if ok else [f"pixel size {size!r}"]
    hp, batches = result
    n, p = hp.n_patches, hp.patch_px
    problems = []
    if n == 0 or p < 1:
        problems.append(f"{n} patches of {p} px")
    if hp.coords.shape != (n, 2) or hp.coords.dtype != np.int64:
        problems.append(f"coords {hp.coords.shape} {hp.coords.dtype}")
    elif np.abs(hp.coords).max(initial=0) > 2**31:
        problems.append("coords beyond 2**31 px (a NaN or 1e38 cast to int?)")
    if not (math.isfinite(hp.pixel_size_um) and hp.pixel_size_um > 0):
        problems.append(f"pixel size {hp.pixel_size_um}")
    problems += _unique_str(hp.barcodes, "barcodes")
    rows = sum(b.shape[0] for _, b in batches)
    if rows != n or any(b.shape[1:] != (p, p, 3) or b.dtype != np.uint8 for _, b in batches):
        problems.append(f"batches cover {rows} of {n} patches")
    return problems


def _check_gmt(sets) -> list[str]:
    problems = []
    if not isinstance(sets, dict) or not sets:
        return ["not a non-empty dict"]
    for name, genes in sets.items():
        if not isinstance(name, str) or not name.strip():
            problems.append("empty set name")
        if not genes:
            problems.append(f"set {name!r} has no genes")
        problems += _unique_str(genes, f"genes of {name!r}")
        if problems:
            break
    return problems


def _read_authors(log_dir: Path, genes: list[str]):
    """Import the authors' LOG_DIR as a run directory and load that run."""
    from histoprism.integrations.authors import import_checkpoint
    from histoprism.models.run import load

    out = log_dir.parent / "imported"
    import_checkpoint(log_dir, out, encoder=ENCODER, genes=genes)
    return load(out, device="cpu")


def _read_run(run_dir: Path):
    from histoprism.models.run import load

    return load(run_dir, device="cpu")


@dataclass(frozen=True)
class Reader:
    read: Callable[[Path], object]
    check: Callable[[object], list[str]]


def _readers(seeds: Seeds) -> dict[str, Reader]:
    """Format -> how to read a prepared input, and the invariants of what it returns."""
    from histoprism.expression.genes import read_gmt
    from histoprism.io.cohort import Cohort
    from histoprism.io.readers import read_embeddings, read_spaceranger, read_st

    return {
        "h5ad": Reader(read_st, _check_counts_adata),
        "embeddings_h5": Reader(read_embeddings, _check_embeddings),
        "embeddings_pt": Reader(read_embeddings, _check_embeddings),
        "spaceranger": Reader(read_spaceranger, _check_spaceranger),
        "hest": Reader(_read_hest, _check_hest),
        "gmt": Reader(read_gmt, _check_gmt),
        "metadata": Reader(Cohort, _check_cohort),
        "run": Reader(_read_run, _check_run),
        "authors": Reader(functools.partial(_read_authors, genes=seeds.genes()), _check_run),
        "predict": Reader(functools.partial(_read_predict, run=seeds.run), _check_predict),
        "wsi": Reader(_read_wsi, _check_wsi),
    }


def _check_spaceranger(adata) -> list[str]:
    problems = _check_counts_adata(adata, int_coords=True)
    if "in_tissue" in adata.obs and not (adata.obs["in_tissue"] == 1).all():
        problems.append("spots off tissue kept")
    sf = adata.uns.get("spatial", {}).get("ST", {}).get("scalefactors")
    if not isinstance(sf, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in sf.values()
    ):
        problems.append(f"scalefactors not positive numbers: {sf!r:.80}")
    return problems


# --- one case ---------------------------------------------------------------------------------------
@dataclass
class Result:
    """What one case did."""

    format: str
    mutation: str
    outcome: str
    index: int = -1
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    origin: str = ""  # the innermost histoprism frame of a traceback: whose code let it escape
    unnamed: bool = False  # an InputError whose message names no file
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _tail(exc: BaseException, lines: int = 12) -> str:
    """The last ``lines`` lines of the traceback (where it was raised, and the message)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(tb.rstrip().splitlines()[-lines:])


def _origin(exc: BaseException) -> str:
    """``module.py:line in function`` of the innermost frame in the histoprism package."""
    package = str(Path(__import__("histoprism").__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(package)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).relative_to(package)}:{f.lineno} in {f.name}"


def _problem_key(problem: str) -> str:
    """A silent-wrong problem without its particulars (names, numbers): one key per kind."""
    return re.sub(r"\d+", "N", problem.split(":")[0].split(" (")[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def choose_format(rng: np.random.Generator, formats: tuple[str, ...]) -> str:
    w = np.array([WEIGHTS[f] for f in formats])
    return formats[int(rng.choice(len(formats), p=w / w.sum()))]


def run_case(
    fmt: str,
    seeds: Seeds,
    case: Path,
    rng: np.random.Generator,
    readers: dict[str, Reader],
    announce: Callable[[str], None] | None = None,
) -> Result:
    """Mutate a copy of ``fmt``'s seed under ``case`` and read it; classify what happened.

    ``announce`` is told the mutation before the read (so that a hang can still be described).
    """
    from histoprism._core.errors import InputError

    case.mkdir(parents=True, exist_ok=True)
    prepared = prepare(fmt, seeds, case, rng)
    if announce is not None:
        announce(prepared.mutation)
    reader = readers[fmt]
    start = time.perf_counter()
    result = Result(fmt, prepared.mutation, "ok")
    try:
        value = reader.read(prepared.target)
        result.problems = reader.check(value)
        if result.problems:
            result.outcome, result.exc_type = "silent_wrong", _problem_key(result.problems[0])
            result.message = "; ".join(result.problems)
    except InputError as exc:
        result.outcome, result.exc_type, result.message = "clean", "InputError", _first_line(exc)
        result.unnamed = exc.path is None and str(case) not in str(exc)
    except MemoryError as exc:
        result.outcome, result.exc_type, result.message = "memory", "MemoryError", _first_line(exc)
        result.traceback, result.origin = _tail(exc), _origin(exc)
    except Exception as exc:  # every other exception (RecursionError too) is what we count
        result.outcome, result.exc_type = "traceback", type(exc).__name__
        result.message, result.traceback = _first_line(exc), _tail(exc)
        result.origin = _origin(exc)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No log lines, warnings or progress bars from the readers while fuzzing."""
    os.environ["HISTOPRISM_QUIET"] = "1"
    logging.disable(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def seed_targets(seeds: Seeds) -> dict[str, tuple[Path, ...]]:
    """The unmutated inputs of every format, as ``prepare`` would hand them to the reader."""
    return {
        "h5ad": (seeds.h5ad,),
        "embeddings_h5": seeds.embeddings_h5,
        "embeddings_pt": seeds.embeddings_pt,
        "spaceranger": seeds.spaceranger,
        "hest": (seeds.hest, seeds.hest_metadata),
        "gmt": (seeds.gmt,),
        "metadata": (seeds.cohort,),
        "run": (seeds.run,),
        "authors": (seeds.authors,),
        "predict": (seeds.cohort,),
        "wsi": seeds.wsi,
    }


def check_seeds(seeds: Seeds, work: Path, readers: dict[str, Reader]) -> dict[str, str]:
    """Read every seed unmutated (a copy: some readers write beside their input). Each must be
    'ok' or the counts would mean nothing; this also imports what readers import lazily, so no
    case pays for it."""
    from histoprism._core.errors import InputError

    bad = {}
    for fmt, targets in seed_targets(seeds).items():
        for i, seed in enumerate(targets):
            case = work / f"seed_{fmt}{i}"
            target = _copy(seed, case / seed.name)
            try:
                problems = readers[fmt].check(readers[fmt].read(target))
            except (InputError, Exception) as exc:
                problems = [f"{type(exc).__name__}: {_first_line(exc)}"]
            shutil.rmtree(case, ignore_errors=True)
            if problems:
                bad[f"{fmt} {seed.name}"] = "; ".join(problems)
    return bad


# --- worker processes -------------------------------------------------------------------------------
def _vm_bytes() -> int:
    """This process's mapped address space (VmSize), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_cap(gib: float) -> Iterator[None]:
    """Cap this process's address space at what it maps now plus ``gib`` (restored after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # torch, anndata & co. map ~4 GB of address space at import: the cap is on top of that
    limit = _vm_bytes() + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _worker(conn: Connection, seeds_root: str, work: str, seed: int, formats, memory_gib: float):
    """Import everything, read the seeds, cap the address space, then read cases until told to stop."""
    import torch

    # a group of its own: killing a hung worker must also end the processes its readers forked
    # (an HDF5 check in a forked child, say), which would otherwise spin on as orphans
    os.setpgrp()
    torch.set_num_threads(1)
    seeds, work_dir = Seeds(Path(seeds_root)), Path(work)
    with quiet(), contextlib.ExitStack() as stack:
        readers = _readers(seeds)
        bad = check_seeds(seeds, work_dir, readers)
        stack.enter_context(memory_cap(memory_gib))
        conn.send(("ready", bad))
        while True:
            index = conn.recv()
            if index is None:
                return
            rng = np.random.default_rng([seed, index])
            fmt = choose_format(rng, formats)
            case = work_dir / f"case{index}"
            try:
                result = run_case(
                    fmt, seeds, case, rng, readers, lambda m: conn.send(("started", m))
                )
            except Exception as exc:  # noqa: BLE001 - the mutation itself failed: report it
                result = Result(fmt, "mutation failed", "fuzz_error", exc_type=type(exc).__name__,
                                message=f"{type(exc).__name__}: {_first_line(exc)}",
                                traceback=_tail(exc))  # fmt: skip
            result.index = index
            shutil.rmtree(case, ignore_errors=True)
            conn.send(result)


class Worker:
    """One worker process: starting (importing, reading the seeds), idle, or reading a case."""

    def __init__(self, ctx, args: tuple, name: str) -> None:
        self.work = Path(args[1]) / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, args[0], str(self.work), *args[2:]))
        self.proc.start()
        child.close()
        self.starting = True
        self.bad_seeds: dict[str, str] = {}
        self.index: int | None = None  # the case being read
        self.mutation = ""  # its mutation, once the worker has announced it
        self.since = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.index is not None

    def submit(self, index: int) -> None:
        self.index, self.mutation, self.since = index, "", time.monotonic()
        self.conn.send(index)

    def kill(self) -> None:
        """SIGKILL the worker and every process it started (its process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.kill()  # (in case it died before making its group)
        self.proc.join()
        shutil.rmtree(self.work, ignore_errors=True)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def _lost(worker: Worker, fmt: str, outcome: str, message: str) -> Result:
    """The result of a case whose worker hung or died."""
    return Result(fmt, worker.mutation or "(see --replay)", outcome, index=worker.index,
                  exc_type=message.split(":")[0], message=message)  # fmt: skip


def fuzz(
    n: int,
    seed: int,
    formats: tuple[str, ...],
    *,
    workers: int = 2,
    timeout: float = 20.0,
    memory_gib: float = 4.0,
    progress: bool = True,
) -> tuple[list[Result], dict]:
    """Read ``n`` mutated inputs in ``workers`` processes; return every result and run facts.

    A worker that does not answer within ``timeout`` s is killed (the case is a hang) and a new
    one started in its place while the others carry on; one that dies is a memory failure when
    killed by SIGKILL (the OOM killer), else a crash.
    """
    start = time.monotonic()
    ctx = mp.get_context("spawn")  # a fresh interpreter: no state shared with this one
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: list[Result] = []
    respawned = 0
    with tempfile.TemporaryDirectory(prefix="histoprism-fuzz-") as tmp:
        with quiet():
            seeds = build_seeds(Path(tmp) / "seeds")
        args = (str(seeds.root), str(Path(tmp) / "work"), seed, formats, memory_gib)
        pool = [Worker(ctx, args, f"w{i}") for i in range(workers)]
        todo = iter(range(n))
        remaining = n
        shown = 0
        while remaining:
            for w in pool:
                if not w.starting and not w.busy and (nxt := next(todo, None)) is not None:
                    w.submit(nxt)
            ready = wait([w.conn for w in pool], timeout=1.0)
            for i, w in enumerate(pool):
                lost = None
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, ConnectionResetError):
                        w.proc.join(5)
                        code = w.proc.exitcode
                        if w.starting or not w.busy:
                            raise SystemExit(
                                f"a worker exited with {code} outside a case"
                            ) from None
                        outcome = "memory" if code == -9 else "crash"
                        lost = _lost(w, choose_format(np.random.default_rng([seed, w.index]), formats),
                                     outcome, f"exit {code}: the worker died")  # fmt: skip
                    else:
                        if isinstance(msg, Result):
                            results.append(msg)
                            w.index, remaining = None, remaining - 1
                        elif msg[0] == "started":
                            w.mutation = msg[1]
                        elif msg[0] == "ready":
                            w.starting, w.bad_seeds = False, msg[1]
                            if w.bad_seeds:
                                for other in pool:
                                    other.kill()
                                raise SystemExit(f"seeds do not read cleanly: {w.bad_seeds}")
                elif w.busy and time.monotonic() - w.since > timeout:
                    fmt = choose_format(np.random.default_rng([seed, w.index]), formats)
                    lost = _lost(w, fmt, "hang", f"timeout: no answer in {timeout:g} s")
                if lost is not None:
                    results.append(lost)
                    remaining -= 1
                    w.kill()  # hung or dead: a fresh worker takes its place
                    respawned += 1
                    pool[i] = Worker(ctx, args, f"w{i}r{respawned}")
            if progress and len(results) >= shown + 500:
                shown = len(results) // 500 * 500
                print(f"  {len(results)}/{n} cases, {time.monotonic() - start:.0f} s", flush=True)
        for w in pool:
            w.stop()
    facts = dict(seconds=round(time.monotonic() - start, 1), respawned=respawned)
    return results, facts


# --- report -----------------------------------------------------------------------------------------
def summarise(results: list[Result], args: dict, facts: dict) -> dict:
    counts: dict[str, Counter] = defaultdict(Counter)
    unnamed: Counter = Counter()
    examples: dict[tuple, list] = defaultdict(list)
    seconds: dict[str, float] = defaultdict(float)
    for r in sorted(results, key=lambda r: r.index):
        counts[r.format][r.outcome] += 1
        unnamed[r.format] += r.unnamed
        seconds[r.format] += r.seconds
        if r.outcome in FAILURES:
            key = (r.format, r.outcome, r.exc_type)
            if len(examples[key]) < MAX_EXAMPLES:
                examples[key].append(
                    dict(
                        index=r.index,
                        mutation=r.mutation,
                        message=r.message,
                        origin=r.origin,
                        traceback=r.traceback,
                    )  # fmt: skip
                )
    totals = Counter()
    for c in counts.values():
        totals.update(c)
    return dict(
        **args,
        **facts,
        outcomes=list(OUTCOMES),
        counts={f: {o: counts[f][o] for o in OUTCOMES} for f in sorted(counts, key=FORMATS.index)},
        totals={o: totals[o] for o in OUTCOMES},
        clean_without_file_name={f: unnamed[f] for f in counts if unnamed[f]},
        read_seconds={f: round(s, 1) for f, s in seconds.items()},
        failures=[
            dict(format=k[0], outcome=k[1], exc_type=k[2], count=_count(results, k), cases=v)
            for k, v in sorted(examples.items())
        ],
        replay="python benchmarks/fuzz.py --seed SEED --formats FORMATS --replay INDEX",
    )


def _count(results: list[Result], key: tuple) -> int:
    return sum((r.format, r.outcome, r.exc_type) == key for r in results)


def table(summary: dict) -> str:
    head = f"{'format':<14}" + "".join(f"{o:>13}" for o in OUTCOMES) + f"{'total':>8}"
    rows = [head, "-" * len(head)]
    for fmt, c in [*summary["counts"].items(), ("all", summary["totals"])]:
        if fmt == "all":
            rows.append("-" * len(head))
        rows.append(
            f"{fmt:<14}" + "".join(f"{c[o]:>13}" for o in OUTCOMES) + f"{sum(c.values()):>8}"
        )
    return "\n".join(rows)


def replay(index: int, seed: int, formats: tuple[str, ...], keep: Path | None) -> Result:
    """Rebuild case ``index`` and read it in this process; print its traceback."""
    tmp = Path(tempfile.mkdtemp(prefix="histoprism-replay-"))
    with quiet():
        seeds = build_seeds(tmp / "seeds")
        rng = np.random.default_rng([seed, index])
        fmt = choose_format(rng, formats)
        case = (keep or tmp / "case").absolute()
        if case.exists():
            shutil.rmtree(case)
        result = run_case(fmt, seeds, case, rng, _readers(seeds))
    result.index = index
    print(
        f"case {index}: {fmt}, {result.mutation}\n-> {result.outcome} {result.exc_type}: {result.message}"
    )
    if result.traceback:
        print(result.traceback)
    print(f"input kept in {case}" if keep else "")
    if keep:
        shutil.copytree(seeds.root, case / "_seeds", dirs_exist_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="mutated inputs to read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "fuzz.json")
    ap.add_argument("--formats", default="all", help=f"comma-separated of {', '.join(FORMATS)}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per input -> 'hang'")
    ap.add_argument("--memory-gib", type=float, default=4.0, help="address space per worker")
    ap.add_argument("--replay", type=int, help="rebuild and read this case in-process")
    ap.add_argument("--keep", type=Path, help="with --replay: keep the mutated input here")
    a = ap.parse_args(argv)
    formats = FORMATS if a.formats == "all" else tuple(a.formats.split(","))
    unknown = set(formats) - set(FORMATS)
    if unknown:
        ap.error(f"unknown format(s) {sorted(unknown)}")
    if a.replay is not None:
        return 0 if replay(a.replay, a.seed, formats, a.keep).outcome in ("ok", "clean") else 1
    results, facts = fuzz(
        a.n, a.seed, formats, workers=a.workers, timeout=a.timeout, memory_gib=a.memory_gib
    )
    summary = summarise(
        results,
        dict(n=a.n, seed=a.seed, formats=list(formats), timeout_s=a.timeout,
             memory_gib=a.memory_gib, workers=a.workers),
        facts,
    )  # fmt: skip
    a.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    print(f"{facts['seconds']:.0f} s, {a.workers} workers; written {a.out}")
    for f in summary["failures"]:
        case = f["cases"][0]
        print(f"  {f['format']} {f['outcome']} {f['exc_type']} x{f['count']}: "
              f"{case['message'][:120]}  [case {case['index']}: {case['mutation'][:80]}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
