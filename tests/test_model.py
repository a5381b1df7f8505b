"""Contract tests over model configurations (shapes, gradients, equivalences), as timm does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from histoprism.models import network as model_mod
from histoprism.models.network import CancerConditioning, EncoderBlock, HistoPrism, ModelConfig

CONFIGS = {
    "paper": dict(),
    "no-conditioning": dict(conditioning=False),
    "positional": dict(positional_encoding=True),
    "neighbours": dict(neighbours=4, standardize_inputs=True),
    "context-tokens": dict(context_tokens=3),
    "local-attention": dict(attention="local", attention_radius_um=1500.0),
    "default": dict(conditioning_site="hidden", norm_first=True, standardize_inputs=True),
    "hidden-context-tokens": dict(conditioning_site="hidden", norm_first=True, context_tokens=3),
    "authors": dict(activation="relu", ff_mult=8, head_norm=True, cross_output_dropout=False),
    "rings-sites-mixed": dict(
        conditioning_site="hidden",
        norm_first=True,
        context_rings_um=(800.0, 1600.0),
        site_um=64.0,
        attention="mixed",
        attention_radius_um=1500.0,
    ),
}
# a zero-initialised output layer passes no gradient to what feeds it on the first step
ZERO_AT_INIT = ("condition.tokens.", "condition.kv.", "condition.q.", "condition.norm.")


def small(**kw) -> ModelConfig:
    return ModelConfig(
        in_dim=24, n_genes=30, n_conditions=3, hidden=32, n_heads=4, cross_heads=4, **kw
    )


def inputs(n=17, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        features=torch.randn(1, n, 24, generator=g),
        condition=torch.tensor([2]),
        coords_um=torch.rand(1, n, 2, generator=g) * 5000,
        neighbours=torch.randint(0, n, (1, n, k), generator=g),
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_gradients_finite(name):
    torch.manual_seed(0)
    model = HistoPrism(small(**CONFIGS[name]))
    out = model(**inputs())
    assert out.shape == (1, 17, 30)
    out.square().mean().backward()
    hidden = model.cfg.conditioning_site == "hidden"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not (hidden and name.startswith(ZERO_AT_INIT) or name.startswith("rings.inp.")):
            assert float(p.grad.abs().sum()) > 0, name


def test_trunk_plus_head_equals_forward():
    model = HistoPrism(small(neighbours=4)).eval()
    x = inputs()
    full = model(**x)
    h = model.trunk(**x)
    torch.testing.assert_close(model.head_out(h), full)


def test_single_context_token_is_a_per_cancer_shift():
    cfg = small()
    cond = CancerConditioning(cfg).eval()
    cond.norm = nn.Identity()
    x = torch.randn(2, 9, 24)
    c = torch.tensor([1, 1])
    shift = cond(x, c) - x
    # the same shift for every spot and slide; another cancer, another shift
    torch.testing.assert_close(shift, shift[:1, :1].expand_as(shift))
    assert not torch.allclose(cond(x, torch.tensor([0, 0])) - x, shift)


def test_single_token_fast_path_equals_attention():
    cond = CancerConditioning(small(context_tokens=1)).eval()
    x, c = torch.randn(2, 9, 24), torch.tensor([1, 2])
    B, N, D = x.shape
    q = nn.Linear(D, D)(x).view(B, N, 4, -1).transpose(1, 2)  # any query: general path, written out
    kv = cond.kv(cond.tokens(c[:, None])).view(B, 1, 2, 4, -1).permute(2, 0, 3, 1, 4)
    a = nn.functional.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2)
    general = cond.norm(x + cond.out(a.reshape(B, N, D)))
    torch.testing.assert_close(cond(x, c), general)


def test_conditioning_changes_predictions_and_ablation_ignores_it():
    torch.manual_seed(0)
    x = inputs()
    with_c = HistoPrism(small()).eval()
    nn.init.normal_(with_c.condition.tokens.weight)
    other = dict(x, condition=torch.tensor([0]))
    assert not torch.allclose(with_c(**x), with_c(**other))
    without = HistoPrism(small(conditioning=False)).eval()
    torch.testing.assert_close(without(**x), without(**other))


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_block_equals_torch_transformer_layer(norm_first):
    cfg = small(dropout=0.0, norm_first=norm_first)
    ours = EncoderBlock(cfg).eval()
    ref = nn.TransformerEncoderLayer(
        32,
        4,
        dim_feedforward=128,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=norm_first,
    ).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.out.weight)
        ref.self_attn.out_proj.bias.copy_(ours.out.bias)
        for a, b in ((ref.linear1, ours.ff[0]), (ref.linear2, ours.ff[3])):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(1, 40, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_without_position_the_model_is_permutation_equivariant():
    model = HistoPrism(small()).eval()
    x = inputs()
    perm = torch.randperm(17)
    permuted = dict(x, features=x["features"][:, perm])
    torch.testing.assert_close(model(**permuted), model(**x)[:, perm], atol=1e-5, rtol=1e-5)


def test_positional_encoding_breaks_permutation_symmetry():
    model = HistoPrism(small(positional_encoding=True)).eval()
    x = inputs()
    perm = torch.randperm(17)
    permuted = dict(x, features=x["features"][:, perm])  # same coords, features moved
    assert not torch.allclose(model(**permuted), model(**x)[:, perm], atol=1e-4)


def test_overfits_one_slide():
    torch.manual_seed(0)
    model = HistoPrism(small(dropout=0.0))
    x = inputs()
    y = torch.randn(1, 17, 30)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = (model(**x) - y).square().mean()
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_config_saved_before_the_attention_settings_still_loads():
    old = ModelConfig().to_dict()
    for name in ("attention", "attention_radius_um", "full_attention_max_spots"):
        del old[name]
    cfg = ModelConfig(**old)  # a config.json written before these fields existed
    assert cfg.attention == "auto" and cfg.full_attention_max_spots == 20_000
    assert cfg.attention_radius_um == 400.0


@pytest.mark.parametrize("bad", [dict(attention="sparse"), dict(attention_radius_um=0.0)])
def test_invalid_attention_settings_are_refused(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_spot_blocks_of_the_per_spot_layers_change_nothing(monkeypatch):
    """The trunk runs standardisation, conditioning and projections in blocks of spots; the
    neighbour mean is taken after the projection. Neither changes the output."""
    torch.manual_seed(0)
    model = HistoPrism(small(neighbours=4, standardize_inputs=True)).eval()
    x = inputs(n=50)
    whole = model(**x)
    monkeypatch.setattr(model_mod, "SPOT_CHUNK", 7)
    torch.testing.assert_close(model(**x), whole, atol=1e-6, rtol=1e-5)
    # the neighbour branch as first written: mean of the D-wide inputs, then the projection
    xs = model.condition((x["features"] - model.feature_mean) / model.feature_std, x["condition"])
    h = model.proj(xs) + model.proj_neighbours(model_mod._gather_mean(xs, x["neighbours"]))
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model.head_out(model.head_hidden(h)), whole, atol=1e-5, rtol=1e-5)


def test_single_token_dropout_path_equals_dropout_on_the_attention_output():
    """Training: out() of the per-head-dropped value, mixed per spot, equals projecting the
    (B, N, D) dropped attention output as SDPA's dropout would give it."""
    cond = CancerConditioning(small()).train()  # 4 cross-attention heads
    ctx = cond.tokens(torch.tensor([[1], [2]]))  # (B, 1, D)
    torch.manual_seed(3)
    got = cond._single_token(ctx, 9, 0.3)
    torch.manual_seed(3)
    keep = (torch.rand(2, 9, 4, 1) >= 0.3).float() / 0.7  # the same draws, per spot and head
    v = cond.kv(ctx)[..., 24:].expand(2, 9, 24).reshape(2, 9, 4, 6)
    torch.testing.assert_close(got, cond.out((v * keep).reshape(2, 9, 24)))
    assert cond._single_token(ctx, 9, 0.0).shape == (2, 1, 24)  # no dropout: one vector per slide


def test_head_on_measured_genes_equals_full_head_columns():
    model = HistoPrism(small()).eval()
    x = inputs()
    genes = torch.tensor([5, 0, 29, 7])
    torch.testing.assert_close(model(**x, genes=genes), model(**x)[..., genes])


def test_attention_dropout_is_the_attn_dropout_setting():
    """attn_dropout (not dropout) drops attention weights: 0 keeps attention deterministic."""
    block = EncoderBlock(dataclasses.replace(small(), dropout=0.0, attn_dropout=0.5)).train()
    x = torch.randn(1, 20, 32)
    assert not torch.allclose(block(x), block(x))
    block = EncoderBlock(dataclasses.replace(small(), dropout=0.0, attn_dropout=0.0)).train()
    torch.testing.assert_close(block(x), block(x))


def test_input_dropout_drops_embedding_features_in_training_only():
    """input_dropout zeroes z-scored embedding features (and rescales the rest) while training;
    in evaluation the model is the one without it."""
    torch.manual_seed(0)
    kw = dict(dropout=0.0, attn_dropout=0.0, conditioning_site="hidden", norm_first=True)
    plain = HistoPrism(small(**kw))
    dropped = HistoPrism(small(**kw, input_dropout=0.5))
    dropped.load_state_dict(plain.state_dict())
    x = inputs()
    torch.testing.assert_close(dropped.eval()(**x), plain.eval()(**x))
    plain.train(), dropped.train()
    torch.testing.assert_close(plain(**x), plain(**x))
    assert not torch.allclose(dropped(**x), dropped(**x))
    seen = []
    dropped.proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    dropped(**x)
    z = (x["features"] - dropped.feature_mean) / dropped.feature_std
    kept = seen[0] != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(seen[0][kept], 2 * z[kept])
    with pytest.raises(ValueError, match="input_dropout must be in"):
        small(input_dropout=1.0)


def test_hidden_conditioning_starts_as_the_unconditioned_model_and_then_learns_the_type():
    """A fresh model with the cancer type after the projection predicts the same for every type
    (its output layer is zero), so conditioning cannot hurt at the start; one step on a slide
    whose expression depends on the type makes the types differ."""
    torch.manual_seed(0)
    model = HistoPrism(small(conditioning_site="hidden", norm_first=True, dropout=0.0))
    x = inputs()
    other = dict(x, condition=torch.tensor([0]))
    torch.testing.assert_close(model.eval()(**x), model(**other))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (model.train()(**x) - 1.0).square().mean() + (model(**other) + 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model.eval()(**x) - model(**other)).abs().mean() > 0.1
    assert model.condition.norm is None  # one token: no query, so no unused weights under DDP


def test_old_run_configs_load_as_the_paper_architecture():
    cfg = ModelConfig(**{k: v for k, v in small().to_dict().items() if k != "conditioning_site"})
    assert cfg.conditioning_site == "input" and cfg.norm_first is False
    with pytest.raises(ValueError, match="conditioning_site"):
        small(conditioning_site="output")


@pytest.mark.parametrize("name", ["paper", "default", "local-attention", "authors"])
def test_inference_path_equals_the_autograd_path(name, monkeypatch):
    """Without autograd the layers after attention run block by block over the attention output
    (no (N, H) temporaries): the same values as with autograd, for any block size."""
    torch.manual_seed(0)
    model = HistoPrism(small(**CONFIGS[name])).eval()
    x = inputs(n=50)
    with_grad = model(**x)  # grad mode: the path training takes
    assert with_grad.requires_grad
    monkeypatch.setattr(model_mod, "SPOT_CHUNK", 7)  # several blocks, the last a partial one
    with torch.no_grad():
        torch.testing.assert_close(model(**x), with_grad.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mode, n, expected",
    [
        ("full", 10, 4),
        ("auto", 10, 4),
        ("auto", 30, 0),
        ("local", 10, 0),
        ("mixed", 10, 2),
        ("mixed", 30, 0),
        ("gated", 10, 4),
        ("gated", 30, 0),
    ],
)
def test_heads_attending_over_the_whole_slide(mode, n, expected):
    model = HistoPrism(small(attention=mode, full_attention_max_spots=20))
    assert model.dense_heads(n) == expected
    assert model.uses_local_attention(n) == (expected < 4 or mode == "gated")


def test_mixed_attention_is_half_within_the_radius_half_over_the_slide():
    torch.manual_seed(0)
    model = HistoPrism(small(attention="mixed", attention_radius_um=1e-3, norm_first=True)).eval()
    x = inputs(n=20)
    block = model.blocks[0]
    y = torch.randn(1, 20, 32)
    w = block.attention_weights(y, x["coords_um"], 1e-3, dense_heads=model.dense_heads(20))
    torch.testing.assert_close(w[0, :2], torch.eye(20).expand(2, -1, -1))  # local: itself only
    assert (w[0, 2:] > 0).all()  # dense heads: every spot
    v = block.qkv(block.norm1(y)).view(1, 20, 3, 4, -1)[:, :, 2].transpose(1, 2)
    plans = model.local_plans(x["coords_um"], 20)
    tiled = block._attend(block.norm1(y), plans, model.dense_heads(20))  # the prediction path
    torch.testing.assert_close(
        tiled, (w @ v).transpose(1, 2).reshape(1, 20, 32), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("gate", [-30.0, 0.0, 1.5, 30.0])
def test_gated_heads_blend_local_and_slide_wide_attention(gate):
    """Each head's output is its learned blend: identity (radius ~0) at gate +inf, dense
    attention at -inf; the prediction path agrees with the weights that explain reads."""
    torch.manual_seed(0)
    model = HistoPrism(small(attention="gated", attention_radius_um=1e-3, norm_first=True)).eval()
    block = model.blocks[0]
    with torch.no_grad():
        block.range_gate.fill_(gate)
    x, y = inputs(n=20), torch.randn(1, 20, 32)
    w = block.attention_weights(y, x["coords_um"], 1e-3, dense_heads=model.dense_heads(20))
    dense = block.attention_weights(y)
    g = torch.sigmoid(torch.tensor(gate))
    torch.testing.assert_close(w, g * torch.eye(20) + (1 - g) * dense, atol=1e-6, rtol=1e-5)
    v = block.qkv(block.norm1(y)).view(1, 20, 3, 4, -1)[:, :, 2].transpose(1, 2)
    plans = model.local_plans(x["coords_um"], 20)
    tiled = block._attend(block.norm1(y), plans, model.dense_heads(20))
    torch.testing.assert_close(
        tiled, (w @ v).transpose(1, 2).reshape(1, 20, 32), atol=1e-5, rtol=1e-4
    )


def test_gated_range_learns():
    torch.manual_seed(0)
    model = HistoPrism(small(attention="gated", attention_radius_um=200.0))
    x = inputs(n=20)
    model(**x).square().mean().backward()
    assert all(b.range_gate.grad.abs().sum() > 0 for b in model.blocks)


def test_mixed_attention_with_a_radius_over_the_slide_is_full_attention():
    torch.manual_seed(0)
    full = HistoPrism(small(attention="full")).eval()
    mixed = HistoPrism(small(attention="mixed", attention_radius_um=1e5)).eval()
    mixed.load_state_dict(full.state_dict())
    x = inputs(n=25)
    torch.testing.assert_close(mixed(**x), full(**x), atol=1e-5, rtol=1e-4)
