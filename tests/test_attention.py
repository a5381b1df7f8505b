"""Local attention: equal to dense attention with a distance mask (outputs and gradients), equal to
the paper's dense attention when the radius covers the slide, linear cost, and the auto switch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from histoprism.models.attention import local_attention, plan_tiles
from histoprism.models.network import HistoPrism, ModelConfig


def dense_reference(q, k, v, coords, radius):
    """Brute force: dense SDPA with the (N, N) mask distance <= radius. (N, h, d) -> (N, h, d)."""
    mask = ((coords[:, None] - coords[None]) ** 2).sum(-1) <= radius**2  # (N, N)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (h, N, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


def qkv(n, h=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g, requires_grad=True) for _ in range(3)]


def assert_same_outputs_and_gradients(coords, radius, *, heads=4, budget=4096, split=2, seed=0):
    q, k, v = qkv(len(coords), h=heads, seed=seed)
    plan = plan_tiles(coords, radius, heads=heads, budget=budget, split=split)
    got, ref = local_attention(q, k, v, plan), dense_reference(q, k, v, coords, radius)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed + 1))
    g_got = torch.autograd.grad((got * weight).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return plan


@pytest.mark.parametrize("radius", [60.0, 150.0, 400.0, 1e9])
def test_local_equals_dense_masked_reference(radius):
    coords = torch.rand(300, 2, generator=torch.Generator().manual_seed(1)) * 1000
    plan = assert_same_outputs_and_gradients(coords, radius)
    if radius < 1000:
        assert len(plan.batches) > 1  # several SDPA calls, really tiled


def test_hex_grid_with_neighbours_exactly_on_the_radius():
    """Visium-like grid: pairs at exactly the radius are in, as in the dense reference."""
    rows, cols = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    xy = np.stack([cols.ravel() * 100.0 + (rows.ravel() % 2) * 50.0, rows.ravel() * 86.6], axis=1)
    assert_same_outputs_and_gradients(torch.tensor(xy, dtype=torch.float32), 200.0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    layout=st.sampled_from(["uniform", "clusters", "line", "duplicates"]),
    radius=st.floats(5.0, 3000.0),
    budget=st.sampled_from([1, 500, 10**6]),
    split=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_property_local_equals_dense_on_random_layouts(n, layout, radius, budget, split, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "uniform":
        coords = torch.rand(n, 2, generator=g) * 2000
    elif layout == "clusters":  # dense blobs far apart: tiles of very different sizes
        centres = torch.rand(3, 2, generator=g) * 20000
        coords = (
            centres[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 50
        )
    elif layout == "line":
        coords = torch.stack([torch.rand(n, generator=g) * 5000, torch.zeros(n)], 1)
    else:  # coincident spots
        coords = (torch.rand(n, 2, generator=g) * 500).round(decimals=-2)
    assert_same_outputs_and_gradients(
        coords, radius, heads=2, budget=budget, split=split, seed=seed
    )


def test_plan_cost_is_linear_in_spots_and_batches_respect_the_budget():
    """On a uniform grid, pairs computed per spot do not grow with the slide; every SDPA call
    holds at most the budget of scores, unless one tile alone exceeds it."""
    per_spot = []
    for side in (30, 60, 120):
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([xx.ravel(), yy.ravel()], 1).float() * 100.0
        plan = plan_tiles(coords, 400.0, heads=8, budget=2**16)
        per_spot.append(plan.key_slots / len(coords))
        for b in plan.batches:
            t, q = b.q.shape
            assert t == 1 or 8 * t * q * b.k.shape[1] <= 2**16
        queries = torch.cat([b.q[b.q_valid] for b in plan.batches])
        assert sorted(queries.tolist()) == list(range(len(coords)))  # every spot a query once
    assert max(per_spot) < 1.3 * min(per_spot) and max(per_spot) < 9 * 5 * 5  # vs N for dense


# --- in the model ----------------------------------------------------------------------------------
def small(**kw) -> ModelConfig:
    base = dict(in_dim=24, n_genes=30, n_conditions=3, hidden=32, n_heads=4, cross_heads=4)
    return ModelConfig(**{**base, "dropout": 0.0, "attn_dropout": 0.0, **kw})


def slide_inputs(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        features=torch.randn(1, n, 24, generator=g),
        condition=torch.tensor([1]),
        coords_um=torch.rand(1, n, 2, generator=g) * 2000,
    )


def _outputs_and_grads(model, x):
    out = model(**x)
    out.square().mean().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_local_with_covering_radius_equals_full_attention():
    """Outputs and every parameter's gradient, training mode (dropout off)."""
    torch.manual_seed(0)
    full = HistoPrism(small(attention="full"))
    local = HistoPrism(small(attention="local", attention_radius_um=math.inf))
    local.load_state_dict(full.state_dict())
    x = slide_inputs()
    out_f, grads_f = _outputs_and_grads(full, x)
    out_l, grads_l = _outputs_and_grads(local, x)
    torch.testing.assert_close(out_l, out_f, atol=1e-5, rtol=1e-5)
    for name, g in grads_f.items():
        torch.testing.assert_close(grads_l[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_auto_switches_to_local_above_the_spot_limit():
    torch.manual_seed(0)
    cfg = dict(attention_radius_um=300.0, full_attention_max_spots=59)
    auto = HistoPrism(small(attention="auto", **cfg)).eval()
    local = HistoPrism(small(attention="local", **cfg)).eval()
    full = HistoPrism(small(attention="full", **cfg)).eval()
    for m in (local, full):
        m.load_state_dict(auto.state_dict())
    x59, x60 = slide_inputs(59), slide_inputs(60)
    torch.testing.assert_close(auto(**x59), full(**x59))  # up to the limit: the paper's attention
    torch.testing.assert_close(auto(**x60), local(**x60))  # above: local
    assert not torch.allclose(auto(**x60), full(**x60), atol=1e-4)
    with pytest.raises(ValueError, match="coords_um"):
        auto(**dict(x60, coords_um=None))


def test_training_with_local_attention_and_dropout_learns():
    torch.manual_seed(0)
    cfg = small(attention="local", attention_radius_um=300.0, dropout=0.1, attn_dropout=0.1)
    model = HistoPrism(cfg)
    x, y = slide_inputs(), torch.randn(1, 60, 30)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (model(**x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
