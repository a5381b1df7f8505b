"""The synthetic cohort: exact on-disk layout, determinism, and the biology the claims rest on."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.spatial import cKDTree
from sklearn.linear_model import Ridge

from histoprism._core import keys
from histoprism.expression.genes import bench_hvg
from histoprism.synthetic import cohort as syn_cohort
from histoprism.synthetic import slide as syn_slide
from histoprism.synthetic import tissue as syn_tissue
from histoprism.synthetic import world as syn_world
from histoprism.synthetic.ceiling import ceiling_at, ceiling_table
from histoprism.synthetic.cohort import SyntheticConfig, make_cohort, tiny
from histoprism.synthetic.tissue import draw_tissue, frame_shape
from histoprism.synthetic.world import DISPERSIONS, make_world

META_COLUMNS = [
    "id",
    "oncotree_code",
    "patient",
    "organ",
    "st_technology",
    "disease_state",
    "pixel_size_um_embedded",
    "pixel_size_um_estimated",
    "spots_under_tissue",
    "nb_genes",
    "inter_spot_dist",
    "spot_diameter",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("tiny"), config=tiny())


def _meta(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / keys.METADATA_FILES[0])


def _splits(root: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(root / keys.SPLITS_DIR / f"{s}_split.csv") for s in keys.SPLIT_NAMES}


def _st(root: Path, sid: str) -> ad.AnnData:
    return ad.read_h5ad(root / keys.ST_DIR / f"{sid}.h5ad")


def _ceiling(root: Path, sid: str) -> ad.AnnData:
    return ad.read_h5ad(root / keys.CEILING_DIR / f"{sid}.h5ad")


def _embedding(root: Path, sid: str) -> dict[str, np.ndarray]:
    with h5py.File(root / keys.EMBEDDINGS_DIR / "synthetic" / f"{sid}.h5", "r") as fh:
        return {name: fh[name][:] for name in (keys.H5_FEATURES, keys.H5_COORDS, keys.H5_BARCODES)}


def _aligned_features(root: Path, sid: str, barcodes: pd.Index) -> np.ndarray:
    emb = _embedding(root, sid)
    order = pd.Index(emb[keys.H5_BARCODES].astype(str)).get_indexer(barcodes)
    assert (order >= 0).all()
    return emb[keys.H5_FEATURES][order]


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column Pearson r of (N, G) arrays; NaN where either column is constant."""
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / den, np.nan)


# --- layout ------------------------------------------------------------------------------------


def test_files_and_metadata_columns(cohort: Path) -> None:
    meta = _meta(cohort)
    assert list(meta.columns) == META_COLUMNS
    assert len(meta) == 8 and meta["id"].str.fullmatch(r"SYN\d{3}").all()
    assert set(meta["oncotree_code"]) == {"IDC", "COAD"}
    assert set(meta["st_technology"]) == {"Visium", "Xenium"}
    assert meta.groupby("patient").size().between(1, 3).all()
    assert (meta[["inter_spot_dist", "spot_diameter"]] == [100, 55]).all().all()
    for sid in meta["id"]:
        for path in (
            cohort / "st" / f"{sid}.h5ad",
            cohort / "ceiling" / f"{sid}.h5ad",
            cohort / "embeddings" / "synthetic" / f"{sid}.h5",
        ):
            assert path.is_file(), path
    assert (cohort / "README.txt").read_text().strip()
    assert not list(cohort.rglob("*.tmp")), "temporary files left behind"


def test_st_h5ad_is_hest_format(cohort: Path) -> None:
    meta = _meta(cohort).set_index("id")
    for sid in meta.index:
        st = _st(cohort, sid)
        assert isinstance(st.X, sparse.csr_matrix) and st.X.dtype == np.float32
        assert (st.X.data >= 0).all() and np.array_equal(st.X.data, np.round(st.X.data))
        assert st.obs_names.is_unique
        assert all(re.fullmatch(r"[ACGT]{16}-1", b) for b in st.obs_names)
        assert st.var_names.is_unique and st.var[keys.VAR_GENE_IDS].str.match(r"ENSG\d{11}").all()
        for col in ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres"):
            assert col in st.obs
        assert (st.obs["in_tissue"] == 1).all()
        assert st.n_obs == meta.loc[sid, "spots_under_tissue"]
        assert st.n_vars == meta.loc[sid, "nb_genes"]
        assert 80 <= st.n_obs <= 200


def test_spatial_is_a_visium_hex_grid(cohort: Path) -> None:
    st = _st(cohort, _meta(cohort)["id"][1])
    xy = st.obsm[keys.OBSM_SPATIAL]
    assert xy.dtype == np.int64 and xy.shape == (st.n_obs, 2)
    assert np.array_equal(xy[:, 0], st.obs["pxl_col_in_fullres"])
    assert np.array_equal(xy[:, 1], st.obs["pxl_row_in_fullres"])
    assert (st.obs["array_col"] % 2 == st.obs["array_row"] % 2).all()
    dist, _ = cKDTree(xy).query(xy, k=7)  # self + the six hex neighbours
    inner = dist[:, 6] < 202  # spots with a full ring of neighbours
    assert inner.sum() > 10
    np.testing.assert_allclose(dist[inner, 1:], 200.0, atol=1.5)  # 100 µm at 0.5 µm/px


def test_embeddings_are_shuffled_and_match_spots(cohort: Path) -> None:
    sid = _meta(cohort)["id"][2]
    st, emb = _st(cohort, sid), _embedding(cohort, sid)
    barcodes = emb[keys.H5_BARCODES]
    assert barcodes.dtype.kind == "S"
    barcodes = barcodes.astype(str)
    assert sorted(barcodes) == sorted(st.obs_names)
    assert list(barcodes) != list(st.obs_names)
    features, coords = emb[keys.H5_FEATURES], emb[keys.H5_COORDS]
    assert features.shape == (st.n_obs, 32) and features.dtype == np.float32
    assert coords.dtype == np.float64  # the one writer, as extract's files
    spatial = pd.DataFrame(st.obsm[keys.OBSM_SPATIAL], index=st.obs_names).loc[barcodes]
    np.testing.assert_array_equal(coords, spatial.to_numpy())


def test_splits_partition_slides_by_patient(cohort: Path) -> None:
    meta, splits = _meta(cohort).set_index("id"), _splits(cohort)
    ids = [s for frame in splits.values() for s in frame[keys.SPLIT_ID]]
    assert sorted(ids) == sorted(meta.index)  # a partition: every slide exactly once
    patients = {name: set(meta.loc[f[keys.SPLIT_ID], "patient"]) for name, f in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    for frame in splits.values():
        assert list(frame.columns) == [keys.SPLIT_ID, keys.META_CANCER]
        assert (
            frame[keys.META_CANCER].to_numpy() == meta.loc[frame[keys.SPLIT_ID]].oncotree_code
        ).all()


@pytest.mark.parametrize("seed", range(25))
def test_tiny_guarantees_every_split_per_cancer(seed: int) -> None:
    cfg = tiny(seed)
    table = syn_cohort._slide_table(cfg, np.random.default_rng(seed))
    counts = table.groupby(["cancer", "split"]).size().unstack(fill_value=0)
    assert (counts[0] >= 2).all() and (counts[1] >= 1).all() and (counts[2] >= 1).all()
    assert table.groupby("patient")["split"].nunique().max() == 1
    assert table["targeted"].sum() == 1


def test_targeted_slides_measure_a_panel(cohort: Path) -> None:
    meta = _meta(cohort)
    visium = _st(cohort, meta.loc[meta.st_technology == "Visium", "id"].iloc[0])
    for sid in meta.loc[meta.st_technology == "Xenium", "id"]:
        xenium = _st(cohort, sid)
        assert xenium.n_vars < visium.n_vars
        assert set(xenium.var_names) <= set(visium.var_names)
    bench = {g for c in ("IDC", "COAD") for g in bench_hvg(c)}
    assert bench <= set(visium.var_names)  # the HEST-bench HVGs are all in the universe


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_slides=2, n_cancers=1, spots=(40, 60), n_genes=120, embed_dim=8)
    a, b = make_cohort(tmp_path / "a", config=cfg), make_cohort(tmp_path / "b", config=cfg)
    c = make_cohort(tmp_path / "c", config=dataclasses.replace(cfg, seed=1))
    pd.testing.assert_frame_equal(_meta(a), _meta(b))
    st_a, st_b, st_c = (_st(root, "SYN000") for root in (a, b, c))
    assert (st_a.X != st_b.X).nnz == 0 and list(st_a.obs_names) == list(st_b.obs_names)
    np.testing.assert_array_equal(
        _embedding(a, "SYN000")[keys.H5_FEATURES], _embedding(b, "SYN000")[keys.H5_FEATURES]
    )
    assert st_a.shape != st_c.shape or (st_a.X != st_c.X).nnz > 0


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_cohort(tmp_path, config=SyntheticConfig(n_cancers=7))
    with pytest.raises(ValueError):
        make_cohort(tmp_path, config=SyntheticConfig(spots=(50, 10)))


# --- ceiling -----------------------------------------------------------------------------------


def test_ceiling_aligns_with_st(cohort: Path) -> None:
    for sid, code in _meta(cohort)[["id", "oncotree_code"]].itertuples(index=False):
        st, ceiling = _st(cohort, sid), _ceiling(cohort, sid)
        assert isinstance(ceiling.X, np.ndarray) and ceiling.X.dtype == np.float32
        assert list(ceiling.obs_names) == list(st.obs_names)
        assert list(ceiling.var_names) == list(st.var_names)
        np.testing.assert_array_equal(ceiling.obsm[keys.OBSM_SPATIAL], st.obsm[keys.OBSM_SPATIAL])
        assert (ceiling.obs[keys.OBS_CANCER] == code).all()
        assert ceiling.uns[keys.UNS_HISTOPRISM]["model"] == "ceiling"
        assert ceiling.uns[keys.UNS_HISTOPRISM]["units"] == keys.UNITS_LOG1P


def test_true_drivers_replay_the_written_slides(cohort: Path) -> None:
    # the replay must reproduce make_cohort's draws: the true niche of every spot (written to the
    # ceiling file) is the largest of the replayed composition drivers, barcode by barcode
    sids = list(_meta(cohort)["id"])
    drivers = syn_cohort.true_drivers(tiny(), sids[:2])
    assert list(drivers) == sids[:2]
    for sid, table in drivers.items():
        ceiling = _ceiling(cohort, sid)
        assert list(table.columns) == list(syn_world.VIS_DRIVERS)
        assert set(table.index) == set(ceiling.obs_names)
        niches = list(ceiling.obs["niche"].cat.categories)
        d = table.loc[ceiling.obs_names, niches].to_numpy()
        k = len(niches)  # undo the standardisation and saturation of the niche shares
        cap, centre, scale = (
            syn_tissue.DRIVER_CAP,
            syn_tissue.DRIVER_CENTRE,
            syn_tissue.DRIVER_SCALE,
        )
        shares = centre[:k] + scale[:k] * cap * np.arctanh(d / cap)
        np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-6)
        assert (np.array(niches)[shares.argmax(1)] == ceiling.obs["niche"].to_numpy()).all()
        assert np.isfinite(table.to_numpy()).all() and table.to_numpy().std(0).min() > 0


def test_ceiling_beats_a_mean_predictor(cohort: Path) -> None:
    meta, splits = _meta(cohort).set_index("id"), _splits(cohort)
    train = [s for s in splits["train"][keys.SPLIT_ID] if meta.loc[s, "st_technology"] == "Visium"]
    train_mean = np.vstack([np.log1p(_st(cohort, s).X.toarray()) for s in train]).mean(0)
    for sid in meta.index[meta.st_technology == "Visium"]:
        truth, ceiling = np.log1p(_st(cohort, sid).X.toarray()), _ceiling(cohort, sid).X
        assert np.nanmean(_pearson(truth, ceiling)) > 0.4  # a constant predictor has r = NaN/0
        assert ((truth - ceiling) ** 2).mean() < ((truth - train_mean) ** 2).mean()


def test_ceiling_is_the_expectation_over_hidden_draws() -> None:
    """Ceiling == Monte-Carlo mean of log1p(counts) over fresh draws of everything hidden."""
    cfg, rng = tiny(), np.random.default_rng(3)
    world, shape = make_world(cfg, rng), frame_shape(cfg)
    tissue = draw_tissue(rng, shape, 60, 0, cfg)
    log_mu = syn_slide._visible_log_mean(world, tissue, 0, targeted=False)
    hidden = np.stack(
        [syn_slide._hidden_log_term(world, cfg, rng, shape, tissue.spots) for _ in range(300)]
    )
    # the ceiling assumes the hidden term is N(0, hidden_sd^2) at every spot
    ratio = hidden.std(axis=0).mean(axis=0) / world.hidden_sd
    assert 0.95 < np.median(ratio) < 1.05 and np.abs(hidden.mean(axis=0)).mean() < 0.1
    counts = syn_slide._draw_counts(rng, log_mu + hidden, world.dispersion)  # (300, N, G)
    monte_carlo = np.log1p(counts).mean(axis=0)
    ceiling = ceiling_at(world.ceiling, log_mu)
    assert np.abs(monte_carlo - ceiling).mean() < 0.04
    assert np.corrcoef(monte_carlo.ravel(), ceiling.ravel())[0, 1] > 0.995


def test_ceiling_table_integrates_noise_exactly() -> None:
    """Gauss-Hermite over N(0, sd^2) and the exact NB sum agree with a large sample."""
    rng = np.random.default_rng(0)
    dispersion, sd = np.array([0, 4, 8]), np.array([0.3, 0.6, 1.0])
    table = ceiling_table(DISPERSIONS[dispersion], sd, 16)
    log_mu = np.array([[-2.0, 0.5, 3.0], [1.0, 5.0, -0.5]], dtype=np.float32)  # (2 spots, 3 genes)
    ceiling = ceiling_at(table, log_mu)
    z = rng.standard_normal((200_000, 1, 3)) * sd
    sample = np.log1p(syn_slide._draw_counts(rng, log_mu + z, dispersion)).mean(axis=0)
    np.testing.assert_allclose(ceiling, sample, atol=0.01)


# --- biology -----------------------------------------------------------------------------------


def _niche_table(root: Path) -> pd.DataFrame:
    """Ceiling expression of every Visium spot with its dominant niche and cancer code."""
    meta = _meta(root)
    frames = []
    for sid, code in meta.loc[meta.st_technology == "Visium", ["id", "oncotree_code"]].values:
        ceiling = _ceiling(root, sid)
        frame = pd.DataFrame(ceiling.X, columns=ceiling.var_names)
        frames.append(frame.assign(niche=ceiling.obs["niche"].to_numpy(), code=code))
    return pd.concat(frames, ignore_index=True)


def test_conditioning_on_cancer_type_matters(cohort: Path) -> None:
    table = _niche_table(cohort)
    means = table.groupby(["niche", "code"], observed=True).mean(numeric_only=True)
    in_sets = {g for genes in syn_world._gpc_sets().values() for g in genes}
    programme_genes = [g for g in means.columns if g in in_sets]
    assert len(programme_genes) > 50
    tumour = means.loc["tumour", programme_genes]
    # the same dominant niche, different expression in the two cancers
    assert (tumour.loc["IDC"] - tumour.loc["COAD"]).abs().max() > 0.5
    # and not just an offset per cancer: the tumour-vs-stroma contrast itself differs
    contrast = means.loc["tumour", programme_genes] - means.loc["stroma", programme_genes]
    assert (contrast.loc["IDC"] - contrast.loc["COAD"]).abs().max() > 0.5


def test_ridge_on_embeddings_beats_the_train_mean(cohort: Path) -> None:
    meta, splits = _meta(cohort).set_index("id"), _splits(cohort)
    visium = set(meta.index[meta.st_technology == "Visium"])
    train = [s for s in pd.concat([splits["train"], splits["val"]])[keys.SPLIT_ID] if s in visium]
    test = [s for s in splits["test"][keys.SPLIT_ID] if s in visium]
    assert train and test

    def load(sid: str) -> tuple[np.ndarray, np.ndarray]:
        st = _st(cohort, sid)
        return _aligned_features(cohort, sid, st.obs_names), np.log1p(st.X.toarray())

    x_train, y_train = map(np.vstack, zip(*[load(s) for s in train], strict=True))
    model = Ridge(alpha=100.0).fit(x_train, y_train)
    for sid in test:
        x, y = load(sid)
        pred = model.predict(x)
        assert np.nanmean(_pearson(y, pred)) > 0.1  # the train mean has r = NaN/0
        assert ((y - pred) ** 2).mean() < ((y - y_train.mean(0)) ** 2).mean()


# --- a family of worlds ---------------------------------------------------------------------------


def test_draw_world_is_deterministic_and_spans_its_ranges() -> None:
    worlds = [syn_world.draw_world(s) for s in range(40)]
    assert syn_world.draw_world(3) == worlds[3]
    for w in worlds:
        assert 2 <= w.n_cancers <= 6 and w.n_slides >= 4 * w.n_cancers
        assert w.embed_dim in syn_world.EMBED_DIMS and w.spots[0] <= w.spots[1]
        assert 0.2 <= w.cancer_effect <= 3.0 and 0.0 <= w.cancer_tell <= 0.6
        assert 0.3 <= w.embed_nonlinearity <= 3.0 and 0.0 <= w.targeted_fraction <= 0.35
    # the draws really vary: both ends of the cancer effect and many embedding sizes
    effects = [w.cancer_effect for w in worlds]
    assert min(effects) < 0.5 and max(effects) > 1.5
    assert len({w.embed_dim for w in worlds}) >= 5
    assert sum(w.targeted_fraction > 0 for w in worlds) >= 10


def test_world_knobs_act_where_they_say() -> None:
    """cancer_effect 0: no gene differs by cancer type; context_strength 0: no neighbourhood or
    slide-level programme; the default knobs reproduce the built-in world exactly."""
    base = dataclasses.replace(tiny(), n_cancers=3)
    flat = make_world(dataclasses.replace(base, cancer_effect=0.0), np.random.default_rng(0))
    assert np.all(flat.offset == 0) and np.allclose(flat.effect[0], flat.effect[1:])
    no_context = make_world(
        dataclasses.replace(base, context_strength=0.0), np.random.default_rng(0)
    )
    assert np.all(no_context.effect[:, syn_world.N_SPOT_DRIVERS :] == 0)
    assert np.any(no_context.effect[:, : syn_world.N_SPOT_DRIVERS] != 0)
    default = make_world(base, np.random.default_rng(0))
    strong = make_world(dataclasses.replace(base, cancer_effect=2.0), np.random.default_rng(0))
    spread = lambda w: np.abs(w.offset).mean()  # noqa: E731
    assert spread(strong) == pytest.approx(2 * spread(default))
    assert syn_world._tanh_rescale(1.0) == pytest.approx(1.0)


def test_embedding_nonlinearity_keeps_the_signal_scale() -> None:
    sds = []
    for gain in (0.3, 1.0, 3.0):
        cfg = dataclasses.replace(tiny(), embed_nonlinearity=gain, spot_noise_sd=0.0)
        cfg = dataclasses.replace(cfg, stain_shift_sd=0.0, stain_scale_sd=0.0)
        rng = np.random.default_rng(0)
        world, shape = make_world(cfg, rng), frame_shape(cfg)
        tissue = draw_tissue(rng, shape, 150, 0, cfg)
        sds.append(syn_slide._embed(world, rng, tissue, cfg).std())
    assert max(sds) / min(sds) < 2.0  # without the rescale, gain 0.3 shrinks it ~4x


def test_a_drawn_world_writes_a_cohort_whose_ceiling_beats_the_mean(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        syn_world.draw_world(5, n_slides=8, n_genes=200), spots=(60, 90), n_cancers=2
    )
    out = make_cohort(tmp_path / "w", config=cfg)
    sid = pd.read_csv(out / "metadata.csv")["id"].iloc[0]
    truth = np.log1p(ad.read_h5ad(out / "st" / f"{sid}.h5ad").X.toarray())
    ceiling = ad.read_h5ad(out / "ceiling" / f"{sid}.h5ad").X
    assert ((truth - ceiling) ** 2).mean() < ((truth - truth.mean(0)) ** 2).mean()
    with h5py.File(out / "embeddings" / "synthetic" / f"{sid}.h5") as fh:
        assert fh["features"].shape[1] == cfg.embed_dim
