"""The published model from the hub: fetched only when allowed, cached, checked, recorded.

A local HTTP server (``hub_server``) stands in for huggingface.co, reached through
``HF_ENDPOINT``; the weights are random ones of the authors' true architecture at the paper's
sizes (UNI 1,024-d, hidden 256, 38,982 genes, 29 cancer codes) under their key names.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hub_server import COMMIT, serve
from test_authors import Opaque, reference

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.expression.genes import stpath_panel
from histoprism.inference.predict import predict
from histoprism.integrations.authors import import_checkpoint
from histoprism.integrations.published import (
    PUBLISHED_REPO,
    RECORDED_LICENCE,
    import_published,
    paper_settings,
)
from histoprism.io.cohort import Cohort, Slide
from histoprism.io.hub import HubFile, licence_of_card, parse_hub_ref
from histoprism.io.readers.embeddings import write_embeddings
from histoprism.io.rundir import load_tensors, weights_notice
from histoprism.models.run import load

SPLIT0, SPLIT1 = "HistoPrism_split0.ckpt", "HistoPrism_split1.ckpt"
HUB = f"hub:{PUBLISHED_REPO}"
CARD = b"---\nlicense: cc-by-nc-nd-4.0\ntags:\n- pathology\n---\n# HistoPrism\n"


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    net = reference(d=1024, g=len(stpath_panel()), h=256, heads=8, layers=2, cross_heads=4)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights(state) -> bytes:
    return _saved(dict(epoch=41, model_state=state, optimizer_state={}, best_val_loss=0.31))


@pytest.fixture(scope="module")
def hub(weights):
    files = {
        (PUBLISHED_REPO, SPLIT0): weights,
        (PUBLISHED_REPO, SPLIT1): weights[: len(weights) // 2],  # a truncated download
        (PUBLISHED_REPO, "opaque.ckpt"): _saved(Opaque()),  # a pickle, not a weights dict
        (PUBLISHED_REPO, "other.ckpt"): _saved(dict(model_state=reference().state_dict())),
        (PUBLISHED_REPO, "README.md"): CARD,
    }
    server, stop = serve(files)
    yield server
    stop()


@pytest.fixture
def endpoint(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.requests.clear()
    return hub


def _slide(seed: int = 3, n: int = 40) -> Slide:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 1024)).astype(np.float32)
    coords = rng.uniform(0, 3000, size=(n, 2))
    return Slide("s", "PAAD", np.array([f"b{i}" for i in range(n)]), feats, coords)


def _predicts(run_dir: Path, slide: Slide) -> np.ndarray:
    p = load(run_dir, device="cpu").predictor
    return p.predict_genes(p.prepare(slide), slice(None))


# --- the reference and the model card ----------------------------------------------------------
def test_hub_refs_are_names_not_paths():
    assert parse_hub_ref("hub:HuSusu/HistoPrism") == ("HuSusu/HistoPrism", None)
    assert parse_hub_ref("hub:HuSusu/HistoPrism@v1.0") == ("HuSusu/HistoPrism", "v1.0")
    for bad in ("HuSusu/HistoPrism", "hub:../etc", "hub:a/b/c", "hub:a/..", "hub:/x", "hub:a/b@.."):
        with pytest.raises(InputError):
            parse_hub_ref(bad)
    with pytest.raises(InputError, match="not a file name"):
        HubFile("a/b", "../config.json")
    assert HubFile("a/b", "w.ckpt").url("http://h/") == "http://h/a/b/resolve/main/w.ckpt"


def test_licence_of_a_model_card():
    assert licence_of_card(CARD.decode()) == "cc-by-nc-nd-4.0"
    other = "---\nlicense: other\nlicense_name: histoprism-terms\n---\ntext"
    assert licence_of_card(other) == "histoprism-terms"
    assert licence_of_card("# no front matter\nlicense: mit\n") is None
    assert licence_of_card("---\n: [unclosed\n---\n") is None
    assert licence_of_card("---\ntags: [a]\n---\n") is None


# --- fetching ----------------------------------------------------------------------------------
def test_download_cache_and_folder_import_predict_the_same(endpoint, weights, tmp_path):
    cache = tmp_path / "cache"
    s = import_published(HUB, tmp_path / "hub_run", split=0, allow_download=True, cache_dir=cache)
    sha = hashlib.sha256(weights).hexdigest()
    assert s["source"] == dict(repo=PUBLISHED_REPO, filename=SPLIT0, revision=COMMIT, sha256=sha)
    assert (
        s["licence"] == "cc-by-nc-nd-4.0"
        and s["licence_source"] == f"model card of {PUBLISHED_REPO}"
    )
    assert s["genes"] == 38982 and s["encoder"] == "uni" and s["epoch"] == 41
    assert endpoint.fetched(SPLIT0) == 1
    imported = load(tmp_path / "hub_run", device="cpu").config["imported"]
    assert imported["weights"]["sha256"] == sha and imported["split"] == 0
    assert imported["licence"] == "cc-by-nc-nd-4.0"

    # the same file imported from the authors' folder layout with their config.yml
    log_dir = tmp_path / "log"
    (log_dir / "ckpt").mkdir(parents=True)
    (log_dir / "ckpt" / "best_model.pt").write_bytes(weights)
    (log_dir / "config.yml").write_text(yaml.safe_dump(paper_settings(0)))
    import_checkpoint(log_dir, tmp_path / "folder_run")
    a = load_tensors(tmp_path / "hub_run" / keys.RUN_WEIGHTS)
    b = load_tensors(tmp_path / "folder_run" / keys.RUN_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    slide = _slide()
    np.testing.assert_array_equal(
        _predicts(tmp_path / "hub_run", slide), _predicts(tmp_path / "folder_run", slide)
    )

    # offline from the cache: no request at all, the same record
    before = len(endpoint.requests)
    again = import_published(HUB, tmp_path / "cached_run", split=0, cache_dir=cache)
    assert len(endpoint.requests) == before and again["source"] == s["source"]
    assert again["licence"] == "cc-by-nc-nd-4.0"


def test_nothing_is_fetched_without_allow_download(endpoint, tmp_path):
    with pytest.raises(InputError) as err:
        import_published(HUB, tmp_path / "run", split=0, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "--allow-download" in msg
    assert f"{endpoint.url}/{PUBLISHED_REPO}/resolve/main/{SPLIT0}" in msg
    assert endpoint.requests == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(split=1), "cannot read as a torch checkpoint"),  # truncated
        (dict(file="opaque.ckpt"), "cannot read as a torch checkpoint"),  # not weights
        (dict(file="other.ckpt"), r"expected \(38982, 32\)"),  # another model's weights
        (dict(file="absent.ckpt"), "cannot fetch"),
    ],
)
def test_a_wrong_file_is_one_line_naming_it(endpoint, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message) as err:
        import_published(
            HUB, tmp_path / "run", allow_download=True, cache_dir=tmp_path / "c", **kwargs
        )
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
    if "file" in kwargs and kwargs["file"] != "absent.ckpt":
        assert kwargs["file"] in str(err.value)


def test_a_local_copy_works_offline_and_records_its_hash(endpoint, weights, tmp_path):
    local = tmp_path / "HistoPrism_split0.ckpt"
    local.write_bytes(weights)
    s = import_published(HUB, tmp_path / "run", weights=local, cache_dir=tmp_path / "cache")
    assert endpoint.requests == []
    assert s["source"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert s["licence"] == RECORDED_LICENCE and s["licence_source"] == "recorded by histoprism"
    with pytest.raises(InputError, match="file not found"):
        import_published(HUB, tmp_path / "x", weights=tmp_path / "missing.ckpt")


# --- predict names the licence once --------------------------------------------------------------
def test_predict_names_the_licence_once(endpoint, cohort_copy, tmp_path, caplog):
    run = tmp_path / "run"
    import_published(HUB, run, split=0, allow_download=True, cache_dir=tmp_path / "cache")
    notice = weights_notice(load(run, device="cpu").config)
    assert "cc-by-nc-nd-4.0" in notice and f"{PUBLISHED_REPO}/{SPLIT0}" in notice
    cohort = cohort_copy()
    ids = Cohort(cohort.root).ids("test")
    rng = np.random.default_rng(0)
    for sid in ids:
        with h5py.File(cohort.emb_path(sid), "r") as f:
            coords, barcodes = f[keys.H5_COORDS][...], f[keys.H5_BARCODES][...].astype(str)
        feats = rng.normal(size=(len(coords), 1024)).astype(np.float32)
        write_embeddings(cohort.emb_path(sid, "uni"), feats, coords, barcodes)
    with caplog.at_level(logging.WARNING, logger="histoprism.inference.predict"):
        written = predict(
            run, cohort.root, "uni", tmp_path / "pred", samples="test", progress=False
        )
    assert len(written) == len(ids) >= 2
    assert [r.getMessage() for r in caplog.records].count(notice) == 1
    assert weights_notice({"model": "histoprism"}) is None


# --- the command ---------------------------------------------------------------------------------
def _cli(*args, hub_url: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HISTOPRISM_QUIET": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "histoprism", "import-checkpoint", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_import_checkpoint_from_the_hub_command(hub, tmp_path):
    home = tmp_path / "hf"
    ref = f"hub:{PUBLISHED_REPO}"
    hub.requests.clear()
    refused = _cli(ref, "--split", "0", "--out", tmp_path / "r0", hub_url=hub.url, home=home)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--allow-download" in refused.stderr and hub.requests == []  # not even a HEAD
    assert not (tmp_path / "r0").exists()
    args = (ref, "--split", "0", "--allow-download", "--out", tmp_path / "r1")
    done = _cli(*args, hub_url=hub.url, home=home)
    assert done.returncode == 0, done.stderr
    assert "cc-by-nc-nd-4.0" in done.stdout and f"{PUBLISHED_REPO}/{SPLIT0}" in done.stdout
    assert hub.fetched(SPLIT0) == 1 and any(home.rglob(SPLIT0))  # in huggingface_hub's cache
    log_only = _cli(
        tmp_path / "r1", "--split", "1", "--out", tmp_path / "r2", hub_url=hub.url, home=home
    )
    assert log_only.returncode == 2 and "--split is for hub: references" in log_only.stderr


def test_the_suite_refuses_connections_beyond_this_machine():
    """conftest's guard, in this process and in a child. The audit events are raised by hand
    (``sys.audit``), so nothing could leave the machine even without the guard; what it refuses
    would fail the session, so the log is put back as it was."""
    import conftest

    log = conftest.NETWORK_LOG
    before = log.read_text() if log.exists() else ""
    try:
        with (
            socket.socket() as sock,
            pytest.raises(ConnectionRefusedError, match="network access during the tests"),
        ):
            sys.audit("socket.connect", sock, ("192.0.2.1", 443))  # TEST-NET-1
        with socket.socket() as sock:
            sys.audit("socket.connect", sock, ("127.0.0.1", 443))  # loopback: allowed
        with pytest.raises(socket.gaierror, match="network access during the tests"):
            sys.audit("socket.getaddrinfo", "huggingface.co", 443, 0, 0, 0)
        child = "import socket, sys; sys.audit('socket.connect', socket.socket(), ('192.0.2.1', 1))"
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
        assert result.returncode != 0 and "network access during the tests" in result.stderr
        tried = log.read_text()[len(before) :].splitlines()
        assert len(tried) == 3 and "getaddrinfo huggingface.co" in tried[1], tried
    finally:
        log.write_text(before)
