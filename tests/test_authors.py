"""The authors' network (susuhu/HistoPrism) and importing its checkpoints.

The reference below is built here from torch's own modules under the authors' attribute names and
in their forward order: graph convolution (not run: n_conv_layers 0), cancer one-hot ->
Linear(C -> D) as key and value of a cross-attention from the patch embedding, Add & LayerNorm,
projection to H, torch's TransformerEncoder (defaults: ReLU, width 2,048, post-norm), head
Linear -> LayerNorm -> ReLU -> Dropout -> Linear.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from histoprism._core.errors import InputError
from histoprism.expression.genes import stpath_panel
from histoprism.inference import predict
from histoprism.integrations import authors
from histoprism.integrations.authors import (
    authors_parameter_count,
    cancer_codes,
    expected_shapes,
    import_checkpoint,
)
from histoprism.integrations.published import paper_settings
from histoprism.io.cohort import Slide
from histoprism.io.rundir import save_tensors
from histoprism.models.network import CancerConditioning, HistoPrism, ModelConfig
from histoprism.training.recipes import PRESETS

D, H, G, N = 32, 32, 50, 37  # small sizes for the forward tests
GENES = [f"GENE{i}" for i in range(G)]
PAPER_PARAMETERS = 17_210_438  # UNI (1,024-d), 38,982 genes, 29 cancer codes, img_conv left out


class Opaque:
    """An object that only full unpickling could rebuild."""


class GraphConvStandIn(nn.Module):
    """GATConv(D, D)'s parameters under its names (torch_geometric is not a dependency)."""

    def __init__(self, d: int):
        super().__init__()
        self.gconv = nn.Module()
        self.gconv.lin = nn.Linear(d, d, bias=False)
        self.gconv.att_src = nn.Parameter(torch.randn(1, 1, d))
        self.gconv.att_dst = nn.Parameter(torch.randn(1, 1, d))
        self.gconv.bias = nn.Parameter(torch.zeros(d))


class AuthorsNet(nn.Module):
    def __init__(self, d=D, g=G, c=29, h=H, heads=4, layers=2, cross_heads=4, p=0.1):
        super().__init__()
        self.img_conv = GraphConvStandIn(d)
        self.img_norm = nn.LayerNorm(d)
        self.input_proj = nn.Linear(d, h)
        self.onco_embedder = nn.Linear(c, d)
        self.conditioner = nn.Module()
        self.conditioner.attention = nn.MultiheadAttention(
            d, cross_heads, dropout=p, batch_first=True
        )
        self.conditioner.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(h, heads, dropout=p, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.gene_regression_head = nn.Sequential(
            nn.Linear(h, h), nn.LayerNorm(h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, g)
        )

    def forward(self, emb: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """(N, D) patch embeddings of one slide, (C,) one-hot -> (N, G)."""
        context = self.onco_embedder(onehot[None])[None]  # (1, 1, D): key and value
        query = emb[None]  # (1, N, D)
        attended, _ = self.conditioner.attention(query, context, context)
        x = self.conditioner.norm(query + attended)
        h = self.transformer(self.input_proj(x))
        return self.gene_regression_head(h)[0]


def reference(seed: int = 0, **kw) -> AuthorsNet:
    """Random weights everywhere (LayerNorms too), in eval mode."""
    torch.manual_seed(seed)
    net = AuthorsNet(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


# the paper's config.yml at the small test sizes
SETTINGS = dict(paper_settings(0), transformer_heads=4, hidden_dim=H)


def write_log_dir(root, state: dict, settings: dict | None = None, **ckpt):
    """The authors' run layout: config.yml and ckpt/best_model.pt."""
    (root / "ckpt").mkdir(parents=True)
    (root / "config.yml").write_text(yaml.safe_dump(settings or SETTINGS))
    saved = dict(
        epoch=12, model_state=state, optimizer_state={}, scheduler_state=None, best_val_loss=0.25
    )
    torch.save({**saved, **ckpt}, root / "ckpt" / "best_model.pt")
    return root


@pytest.fixture
def log_dir(tmp_path):
    return write_log_dir(tmp_path / "log", reference().state_dict())


def embeddings(seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, D)).astype(np.float32)


def slide(cancer: str, features: np.ndarray) -> Slide:
    coords = np.random.default_rng(2).uniform(0, 3000, size=(N, 2))
    return Slide("s", cancer, np.array([f"b{i}" for i in range(N)]), features, coords)


# --- the network -------------------------------------------------------------------------------
def test_imported_run_predicts_as_the_authors_network(log_dir, tmp_path):
    summary = import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic", genes=GENES)
    run = predict.load(tmp_path / "run", device="cpu")
    ref, x = reference(), embeddings()
    codes = cancer_codes()
    assert run.vocab.codes == tuple(codes) and run.panel.genes == tuple(GENES)
    worst = 0.0
    for c, code in enumerate(codes):
        prepared = run.predictor.prepare(slide(code, x))
        ours = run.predictor.predict_genes(prepared, slice(None))
        with torch.no_grad():
            theirs = ref(torch.from_numpy(x), nn.functional.one_hot(torch.tensor(c), 29).float())
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=1e-5, err_msg=code)
        worst = max(worst, float(np.abs(ours - theirs.numpy()).max()))
    assert worst < 1e-5
    # a different type changes the prediction: the conditioning was carried over
    other = run.predictor.predict_genes(run.predictor.prepare(slide("IDC", x)), slice(None))
    assert np.abs(other - ours).max() > 1e-3
    assert summary["epoch"] == 12 and summary["best_val_loss"] == 0.25
    assert summary["encoder"] == "synthetic" and summary["genes"] == G
    assert run.config["encoder"] == "synthetic" and run.config["best_epoch"] == 12


def test_paper_preset_has_the_authors_parameter_count():
    cfg = ModelConfig(**PRESETS["paper"][0])  # 1,024-d, 38,982 genes, 29 codes by default
    with torch.device("meta"):
        ours = HistoPrism(cfg)
        theirs = AuthorsNet(d=1024, g=38982, h=256, heads=8)
    counted = sum(p.numel() for n, p in theirs.named_parameters() if not n.startswith("img_conv."))
    assert counted == PAPER_PARAMETERS
    assert authors_parameter_count(ours) == PAPER_PARAMETERS
    # trainable here: less their dead query projection, one-hot bias and img_norm (D^2 + 4D)
    assert sum(p.numel() for p in ours.parameters()) == PAPER_PARAMETERS - (1024**2 + 4 * 1024)
    # the importer expects exactly their keys and shapes at this size (img_* set aside)
    used = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if not k.startswith("img_")}
    assert expected_shapes(cfg) == used


def test_summary_counts_parameters_as_the_authors(log_dir, tmp_path):
    summary = import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic", genes=GENES)
    counted = sum(v.numel() for k, v in reference().state_dict().items() if "img_conv" not in k)
    assert summary["n_parameters"] == counted


def test_img_conv_weights_are_ignored_and_listed(log_dir, tmp_path):
    summary = import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic", genes=GENES)
    assert summary["ignored"] == [
        "img_conv.gconv.att_dst",
        "img_conv.gconv.att_src",
        "img_conv.gconv.bias",
        "img_conv.gconv.lin.weight",
        "img_norm.bias",
        "img_norm.weight",
    ]
    assert (
        predict.load(tmp_path / "run", device="cpu").config["imported"]["ignored"]
        == (summary["ignored"])
    )


def test_ddp_prefix_is_removed(tmp_path):
    state = {f"module.{k}": v for k, v in reference().state_dict().items()}
    write_log_dir(tmp_path / "log", state)
    import_checkpoint(tmp_path / "log", tmp_path / "a", encoder="synthetic", genes=GENES)
    plain = write_log_dir(tmp_path / "plain", reference().state_dict())
    import_checkpoint(plain, tmp_path / "b", encoder="synthetic", genes=GENES)
    x = slide("COAD", embeddings())
    a, b = (predict.load(tmp_path / r, device="cpu").predictor for r in ("a", "b"))
    np.testing.assert_array_equal(
        a.predict_genes(a.prepare(x), slice(None)), b.predict_genes(b.prepare(x), slice(None))
    )


def test_bundled_panel_and_uni_name_by_default(tmp_path):
    """Without genes= the head must be the 38,982-gene panel; PFM_name uni names our 'uni'."""
    state = reference(d=1024, g=len(stpath_panel()), h=8, heads=2).state_dict()
    settings = dict(SETTINGS, transformer_heads=2, hidden_dim=8)
    write_log_dir(tmp_path / "log", state, settings)
    summary = import_checkpoint(tmp_path / "log", tmp_path / "run")
    assert summary["encoder"] == "uni" and summary["genes"] == 38982
    run = predict.load(tmp_path / "run", device="cpu")
    assert run.panel.genes == tuple(stpath_panel()) and run.config["in_dim"] == 1024


def test_import_checkpoint_command(tmp_path):
    """The CLI: one summary line; a wrong checkpoint is one error line naming the key."""
    from typer.testing import CliRunner

    from histoprism.cli import app

    state = reference(d=1024, g=len(stpath_panel()), h=8, heads=2).state_dict()
    log = write_log_dir(tmp_path / "log", state, dict(SETTINGS, transformer_heads=2, hidden_dim=8))
    result = CliRunner().invoke(app, ["import-checkpoint", str(log), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "imported" in result.stdout and str(tmp_path / "r") in result.stdout
    assert predict.load(tmp_path / "r", device="cpu").config["encoder"] == "uni"
    state.pop("gene_regression_head.0.weight")
    bad = write_log_dir(tmp_path / "bad", state, dict(SETTINGS, transformer_heads=2, hidden_dim=8))
    result = CliRunner().invoke(app, ["import-checkpoint", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "gene_regression_head.0.weight" in result.output
    assert not (tmp_path / "x").exists()


def test_authors_order_of_cancer_codes():
    codes = cancer_codes()
    assert len(codes) == 29 and codes[0] == "PAAD" and codes[17] == "Unknown"


# --- errors ----------------------------------------------------------------------------------------
def _broken(tmp_path, edit, settings=None):
    state = reference().state_dict()
    edit(state)
    return write_log_dir(tmp_path / "log", state, settings)


def test_missing_key_is_named(tmp_path):
    log = _broken(tmp_path, lambda s: s.pop("conditioner.norm.weight"))
    with pytest.raises(InputError, match=r"best_model\.pt: missing weight 'conditioner\.norm\."):
        import_checkpoint(log, tmp_path / "run", encoder="synthetic", genes=GENES)


def test_wrong_shape_is_named(tmp_path):
    key = "transformer.layers.1.linear2.weight"
    log = _broken(tmp_path, lambda s: s.__setitem__(key, torch.zeros(H, 7)))
    with pytest.raises(InputError, match=rf"weight '{key}' has shape \(32, 7\)"):
        import_checkpoint(log, tmp_path / "run", encoder="synthetic", genes=GENES)


def test_unexpected_key_is_named(tmp_path):
    log = _broken(tmp_path, lambda s: s.__setitem__("rnd_predictor.weight", torch.zeros(3)))
    with pytest.raises(InputError, match="unexpected weight 'rnd_predictor.weight'"):
        import_checkpoint(log, tmp_path / "run", encoder="synthetic", genes=GENES)


def test_head_of_another_panel_is_refused_without_genes(log_dir, tmp_path):
    with pytest.raises(InputError, match=r"gene_regression_head\.4\.weight.*gene panel"):
        import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic")


def test_checkpoint_without_model_state_is_refused(tmp_path):
    (tmp_path / "log" / "ckpt").mkdir(parents=True)
    (tmp_path / "log" / "config.yml").write_text(yaml.safe_dump(SETTINGS))
    torch.save({"state_dict": reference().state_dict()}, tmp_path / "log/ckpt/best_model.pt")
    with pytest.raises(InputError, match=r"best_model\.pt: .*'model_state'"):
        import_checkpoint(tmp_path / "log", tmp_path / "run", encoder="synthetic", genes=GENES)


def test_checkpoint_holding_code_is_not_run(tmp_path):
    """weights_only: a pickled object other than tensors and plain values is refused."""
    state = reference().state_dict()
    write_log_dir(tmp_path / "log", state, optimizer_state=Opaque())
    with pytest.raises(InputError, match=r"best_model\.pt: cannot read"):
        import_checkpoint(tmp_path / "log", tmp_path / "run", encoder="synthetic", genes=GENES)


@pytest.mark.parametrize("missing", ["config.yml", "ckpt/best_model.pt"])
def test_missing_file_is_named(log_dir, tmp_path, missing):
    (log_dir / missing).unlink()
    with pytest.raises(InputError, match=f"{missing}: file not found"):
        import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic", genes=GENES)


def test_graph_convolution_in_use_is_refused(tmp_path):
    settings = dict(SETTINGS, graph_config=dict(conv_type="gat", n_conv_layers=1))
    log = _broken(tmp_path, lambda s: None, settings)
    with pytest.raises(InputError, match=r"config\.yml: graph_config\.n_conv_layers is 1"):
        import_checkpoint(log, tmp_path / "run", encoder="synthetic", genes=GENES)


def test_encoder_of_another_dimension_is_refused(log_dir, tmp_path):
    """config.yml says uni (1,024-d); these weights take 32-d embeddings."""
    with pytest.raises(InputError, match=r"'uni' gives 1024-d embeddings.*32-d"):
        import_checkpoint(log_dir, tmp_path / "run", genes=GENES)


def test_failed_import_leaves_nothing_and_existing_run_is_kept(log_dir, tmp_path, monkeypatch):
    import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic", genes=GENES)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(InputError, match="already exists"):
        import_checkpoint(log_dir, tmp_path / "run", encoder="synthetic", genes=GENES)
    assert (tmp_path / "run" / "config.json").read_text() == before

    def weights_then_crash(run_dir, *, config, tensors):
        save_tensors(run_dir / "model.safetensors", tensors)
        raise OSError("disk full")

    monkeypatch.setattr(authors, "save_run", weights_then_crash)
    with pytest.raises(OSError):
        import_checkpoint(log_dir, tmp_path / "other", encoder="synthetic", genes=GENES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "run"]  # no partial directory


# --- options and old configs ---------------------------------------------------------------------
def test_configs_from_before_the_authors_options_build_the_same_module():
    old = ModelConfig(**PRESETS["default"][0]).to_dict()
    for name in ("activation", "head_norm", "cross_output_dropout"):
        del old[name]  # a config.json written before these settings existed
    model = HistoPrism(ModelConfig(**old))
    assert [type(m) for m in model.head_hidden] == [nn.Linear, nn.GELU, nn.Dropout]
    assert all(isinstance(b.ff[1], nn.GELU) for b in model.blocks)
    head_keys = [k for k in model.state_dict() if k.startswith("head_hidden.")]
    assert head_keys == ["head_hidden.0.weight", "head_hidden.0.bias"]
    assert model.blocks[0].ff[0].out_features == 4 * model.cfg.hidden
    assert model.condition.output_dropout is True


def test_paper_cross_attention_drops_attention_weights_only():
    """Training: with cross_output_dropout off, the layer's output is the attention-weight
    dropout path alone (as nn.MultiheadAttention); on, a second dropout follows."""
    base = dict(in_dim=24, n_conditions=3, cross_heads=4, dropout=0.3)
    x, c = torch.randn(2, 9, 24), torch.tensor([1, 2])
    for flag in (False, True):
        torch.manual_seed(0)
        cond = CancerConditioning(ModelConfig(**base, cross_output_dropout=flag)).train()
        ctx = cond.tokens(c[:, None])
        torch.manual_seed(5)
        got = cond(x, c)
        torch.manual_seed(5)
        weights_only = cond.norm(x + cond._single_token(ctx, 9, 0.3))
        assert torch.allclose(got, weights_only) is (not flag)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="swish")
