"""The authors' published pan-cancer model as a run directory, without training anything.

The authors publish the weights of their two paper runs on the Hugging Face hub
(``HuSusu/HistoPrism``: ``HistoPrism_split0.ckpt``, ``HistoPrism_split1.ckpt``), each a
``torch.save`` dict with ``model_state`` as ``import_checkpoint`` reads it. Their training
configuration is not fetched: both paper runs used the same one (their
``checkpoints_paper/split_{0,1}_paper/config.yml``), written below as ``paper_settings``: UNI
embeddings, the 29 cancer codes in their order, the 38,982-gene STPath panel.

Only ``allow_download=True`` opens a connection; a file in the hub cache, or a local copy
(``weights=``), works offline. The run records where the weights came from (repository, file,
revision, sha256) and the licence they are published under; ``predict`` says it once per run
(``io.rundir.weights_notice``).
"""

from __future__ import annotations

from pathlib import Path

from .._core.errors import InputError
from ..io.hub import HubFile, card_licence, fetch, parse_hub_ref, sha256_of
from .authors import AUTHORS_CODE, convert

PUBLISHED_REPO = "HuSusu/HistoPrism"
SPLITS = (0, 1)
# what the package records of the weights' terms when the model card at hand states none
RECORDED_LICENCE = "CC-BY-NC-ND-4.0"


def published_file(split: int) -> str:
    """The file name of the paper run trained on ``split``."""
    if split not in SPLITS:
        raise InputError(f"the paper has splits {', '.join(map(str, SPLITS))}, not {split}")
    return f"HistoPrism_split{split}.ckpt"


def paper_settings(split: int) -> dict:
    """The authors' training configuration of the paper runs (their config.yml), as far as it
    shapes the network; the two splits differ only in the slides they trained on."""
    return dict(
        model="HistoPrism",
        PFM_name="uni",
        dropout_rate=0.1,
        transformer_heads=8,
        transformer_layers=2,
        hidden_dim=256,
        graph_config=dict(conv_type=None, n_conv_layers=0, knn=8),
        onco_onehot_dim=29,
        conditioning_strategy="cross_attention",
        cross_attn_heads=4,
        paths_config=dict(
            gene_list_path="data/gene_panel/stpath_genes.yaml", splits_path=f"data/split_{split}"
        ),
    )


def import_published(
    source: str,
    out: str | Path,
    *,
    split: int = 0,
    file: str | None = None,
    weights: str | Path | None = None,
    allow_download: bool = False,
    cache_dir: str | Path | None = None,
) -> dict:
    """The published model of paper split ``split`` as the run directory ``out``; the summary of
    ``import_checkpoint`` plus ``source`` (repository, filename, revision, sha256), ``licence``
    and ``licence_source``.

    source: ``hub:owner/name[@revision]``, e.g. ``hub:HuSusu/HistoPrism``. file: the weights
    file in it (default ``HistoPrism_split{split}.ckpt``). weights: a local copy of that file,
    used instead of the hub (nothing fetched). Otherwise the hub cache is used, and the file is
    downloaded only with ``allow_download``; without it, a file not in the cache is a one-line
    InputError saying what would be fetched.
    """
    repo, revision = parse_hub_ref(source)
    hub_file = HubFile(repo, file or published_file(split), revision or "main")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise InputError("file not found (--weights: a local copy of the weights)", path)
        origin = dict(repo=repo, filename=hub_file.filename, revision=None, sha256=sha256_of(path))
        origin["local_file"] = str(path.resolve())
    else:
        fetched = fetch(hub_file, allow_download=allow_download, cache_dir=cache_dir)
        path, origin = fetched.path, fetched.record()
    licence = card_licence(
        repo, origin["revision"] or hub_file.revision, allow_download=allow_download,
        cache_dir=cache_dir,
    )  # fmt: skip
    licence_source = f"model card of {repo}" if licence else "recorded by histoprism"
    imported = dict(
        source=AUTHORS_CODE,
        weights=origin,
        split=split,
        licence=licence or RECORDED_LICENCE,
        licence_source=licence_source,
    )
    settings = paper_settings(split)
    summary = convert(settings, path, out, config_path=path, imported=imported)
    return {**summary, "source": origin, "licence": imported["licence"],
            "licence_source": licence_source}  # fmt: skip


__all__ = [
    "PUBLISHED_REPO",
    "RECORDED_LICENCE",
    "import_published",
    "paper_settings",
    "published_file",
]
