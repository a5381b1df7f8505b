"""Sites and rings (models/spatial.py): what they read, that their cost follows the tissue area
and not the pitch, and that the network using them stays a function of the tissue, not of the
order of spots in a file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from histoprism.io.cohort import Cohort
from histoprism.models.inputs import CancerVocabulary, to_tensors
from histoprism.models.network import HistoPrism, ModelConfig
from histoprism.models.spatial import spatial_plan, spot_pitch
from histoprism.training.data import random_crop

RINGS = (150.0, 250.0, 450.0)


def hex_grid(rows: int, cols: int, pitch: float = 100.0) -> np.ndarray:
    """(rows * cols, 2) Visium-like spot centres in µm."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = c * pitch + (r % 2) * pitch / 2
    return np.stack([x.ravel(), (r * pitch * np.sqrt(3) / 2).ravel()], axis=1).astype(float)


def square_grid(side_um: float, pitch: float) -> np.ndarray:
    """Bin centres of a square of tissue ``side_um`` across at ``pitch`` µm."""
    n = int(round(side_um / pitch))
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([i.ravel(), j.ravel()], axis=1) * pitch + pitch / 2


def ring_rows(plan, kind: int, ring: int) -> torch.Tensor:
    """Dense (S, S) block of the ring operator: kind 0 means, 1 x moments, 2 y moments."""
    S, R = plan.n_sites, len(plan.rings_um)
    return plan.rings.to_dense()[(kind * R + ring) * S : (kind * R + ring + 1) * S]


def small_model(*, fresh: bool = False, **kw) -> HistoPrism:
    """A tiny network; unless ``fresh``, its ring output layer is drawn at random (it starts at
    zero), so that the rings move its predictions."""
    torch.manual_seed(0)
    cfg = dict(in_dim=8, n_genes=5, n_conditions=3, hidden=16, n_heads=2, cross_heads=2)
    model = HistoPrism(ModelConfig(**{**cfg, "norm_first": True, "attn_dropout": 0.0, **kw}))
    if model.rings is not None and not fresh:
        torch.nn.init.normal_(model.rings.out.weight, std=0.3)
    return model.eval()


def test_rings_of_a_visium_spot_are_its_hexagonal_neighbourhood():
    xy = hex_grid(15, 15)
    plan = spatial_plan(xy, RINGS)
    centre = 7 * 15 + 7
    assert plan.site is None and plan.n_sites == len(xy)  # Visium spots are their own sites
    counts = [int((ring_rows(plan, 0, r)[centre] > 0).sum()) for r in range(3)]
    assert counts == [6, 12, 54]  # 100 µm; 173 and 200 µm; six shells from 265 to 436 µm
    for r in range(3):
        assert ring_rows(plan, 0, r)[centre].sum().item() == pytest.approx(1.0)  # means
        for kind in (1, 2):  # a full ring has no direction: its moments cancel
            assert abs(ring_rows(plan, kind, r)[centre].sum().item()) < 1e-5
    torch.testing.assert_close(plan.occupancy[centre], torch.ones(3))
    corner = plan.occupancy[0]
    assert (corner < 0.6).all()  # a corner spot sees tissue on a quarter to a half of each ring


def test_ring_moments_point_up_the_gradient_of_a_field():
    xy = hex_grid(15, 15)
    plan = spatial_plan(xy, RINGS)
    field = torch.from_numpy(xy[:, :1].astype(np.float32))  # grows along x
    centre = 7 * 15 + 7
    for r in range(3):
        mean_x = (ring_rows(plan, 0, r) @ field)[centre].item()
        assert mean_x == pytest.approx(xy[centre, 0], abs=1e-3)  # symmetric ring: mean at centre
        assert (ring_rows(plan, 1, r) @ field)[centre].item() > 50  # x moment: field rises in +x
        assert abs((ring_rows(plan, 2, r) @ field)[centre].item()) < 1e-2  # and not along y


def test_fine_bins_are_pooled_into_sites_whose_count_follows_the_area_not_the_pitch():
    plans = {p: spatial_plan(square_grid(1024, p), RINGS, 64.0) for p in (16.0, 8.0, 2.0)}
    for pitch, plan in plans.items():
        assert plan.n_sites == 16 * 16  # 1,024 µm / 64 µm sites, at every pitch
        bins_per_site = torch.bincount(plan.site)
        assert (bins_per_site == (64 / pitch) ** 2).all()
    nnz = {p: plan.rings._nnz() for p, plan in plans.items()}
    assert len(set(nnz.values())) == 1  # the same ring operator: cost independent of pitch
    coarse = spatial_plan(hex_grid(10, 10), RINGS, 64.0)
    assert coarse.site is None  # a 100 µm pitch is above half the site side: not pooled


def test_pool_then_spread_gives_each_bin_its_site_mean():
    xy = square_grid(256, 8.0)
    plan = spatial_plan(xy, (), 64.0)
    x = torch.randn(len(xy), 3)
    pooled = plan.pool(x)
    assert pooled.shape == (16, 3) and plan.rings is None
    site0 = plan.site == plan.site[0]
    torch.testing.assert_close(plan.spread(pooled)[0], x[site0].mean(0))


def test_spot_pitch():
    assert spot_pitch(hex_grid(4, 4, 100.0)) == pytest.approx(100.0)
    assert spot_pitch(square_grid(80, 8.0)) == pytest.approx(8.0)
    assert spot_pitch(np.zeros((1, 2))) == float("inf")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60), pooled=st.booleans())
def test_network_with_rings_and_sites_is_equivariant_to_spot_order(seed, n, pooled):
    """A spot's prediction depends on the tissue around it, not on where the file lists it."""
    rng = np.random.default_rng(seed)
    spacing = 8.0 if pooled else 100.0
    xy = rng.integers(0, 40, size=(n, 2)) * spacing + rng.uniform(0, 1, size=(n, 2))
    model = small_model(context_rings_um=RINGS, site_um=64.0)
    x = torch.from_numpy(rng.normal(size=(1, n, 8)).astype(np.float32))
    c = torch.from_numpy(xy.astype(np.float32))[None]
    perm = torch.from_numpy(rng.permutation(n))
    with torch.no_grad():
        y = model(x, torch.tensor([1]), coords_um=c)
        y_perm = model(x[:, perm], torch.tensor([1]), coords_um=c[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], atol=1e-5, rtol=1e-4)


def test_sites_change_nothing_where_every_spot_is_its_own_site():
    xy = torch.from_numpy(hex_grid(8, 8).astype(np.float32))[None]
    x = torch.randn(1, 64, 8)
    with torch.no_grad():
        plain = small_model(context_rings_um=RINGS)(x, torch.tensor([0]), coords_um=xy)
        sited = small_model(context_rings_um=RINGS, site_um=64.0)(
            x, torch.tensor([0]), coords_um=xy
        )
    torch.testing.assert_close(plain, sited)


def test_bins_of_one_site_share_attention_but_keep_their_own_embedding():
    xy = torch.from_numpy(square_grid(256, 8.0).astype(np.float32))[None]  # 16 sites of 64 bins
    model = small_model(context_rings_um=RINGS, site_um=64.0)
    x = torch.randn(1, xy.shape[1], 8)
    plan = model.spatial_plan(xy[0])
    same_site = torch.nonzero(plan.site == plan.site[0]).ravel()
    a, b = same_site[0].item(), same_site[1].item()
    swapped = x.clone()
    swapped[0, [a, b]] = x[0, [b, a]]  # two bins of one site trade embeddings: the site's
    with torch.no_grad():  # mean, its attention and its rings are unchanged
        y = model(x, torch.tensor([0]), coords_um=xy)
        y_swap = model(swapped, torch.tensor([0]), coords_um=xy)
    torch.testing.assert_close(y_swap[0, a], y[0, b], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y_swap[0, b], y[0, a], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(y[0, a], y[0, b])  # and each bin still has its own prediction


def test_rings_start_at_zero_then_learn_from_the_surroundings():
    xy = torch.from_numpy(hex_grid(6, 6).astype(np.float32))[None]
    model = small_model(context_rings_um=RINGS, fresh=True).train()
    x, cond = torch.randn(1, 36, 8), torch.tensor([0])
    without = small_model().train()
    without.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(1)
    y = model(x, cond, coords_um=xy)
    torch.manual_seed(1)
    torch.testing.assert_close(y, without(x, cond, coords_um=xy))  # a fresh model: no rings
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the output layer moves first, then the ring inputs with it
        opt.zero_grad()
        model(x, cond, coords_um=xy).square().mean().backward()
        opt.step()
    assert model.rings.out.weight.abs().sum() > 0 and model.rings.inp.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad",
    [dict(context_rings_um=(250.0, 150.0)), dict(context_rings_um=(0.0,)), dict(site_um=-1.0)],
)
def test_invalid_spatial_settings_are_refused(bad):
    with pytest.raises(ValueError, match="context_rings_um|site_um"):
        ModelConfig(**bad)


def test_spatial_layers_without_coordinates_are_one_clear_error():
    model = small_model(context_rings_um=RINGS)
    with pytest.raises(ValueError, match="coords_um"):
        model(torch.randn(1, 5, 8), torch.tensor([0]))


def test_to_tensors_and_crops_carry_the_plan_of_their_own_spots(tiny_cohort):
    cohort = Cohort(tiny_cohort)
    slide = cohort.slide(cohort.ids("train")[0], "synthetic")
    vocab = CancerVocabulary.from_codes([slide.cancer])
    t = to_tensors(slide, vocab=vocab, in_dim=slide.features.shape[1], rings_um=RINGS)
    assert t.spatial is not None and t.spatial.n_sites == t.n_spots
    crop = random_crop(t, 40, np.random.default_rng(0))
    assert crop.spatial.n_sites == 40 and crop.spatial.rings.shape == (9 * 40, 40)
    torch.testing.assert_close(crop.spatial.site_xy, crop.coords_um)
    model = small_model(in_dim=slide.features.shape[1], context_rings_um=RINGS)
    with torch.no_grad():
        given = model(**crop.model_inputs())
        built = model(**{**crop.model_inputs(), "spatial": None})  # the network builds its own
    torch.testing.assert_close(given, built)


def test_the_spatial_modules_the_rings_replaced_stay_named_variants():
    from histoprism.models.registry import VARIANTS, select_variants
    from histoprism.training.recipes import resolve_config

    default = resolve_config("default")[0]
    assert default["context_rings_um"] and default["site_um"] > 0 and "neighbours" not in default
    assert default["attention"] == "mixed" and default["attention_radius_um"] == 300.0
    expected = {
        "neighbour-mean": dict(neighbours=6, attention="auto", attention_radius_um=400.0),
        "neighbours-18": dict(neighbours=18, attention="auto"),
        "local-attention-300": dict(neighbours=6, attention="local", attention_radius_um=300.0),
    }
    for name, settings_ in expected.items():
        model = resolve_config(VARIANTS[name].config)[0]
        assert not model["context_rings_um"] and model["site_um"] == 0
        assert {k: model[k] for k in settings_} == settings_
        assert model["input_dropout"] == 0.0  # as the recipes they were measured with
    # the default of 0.3.0: today's without input dropout, and nothing else changed
    before = resolve_config(VARIANTS["no-input-dropout"].config)[0]
    assert default["input_dropout"] == 0.2 and before == {**default, "input_dropout": 0.0}
    expected["no-input-dropout"] = {}
    assert not set(expected) & {v.name for v in select_variants(None)}  # only when named
    assert [v.name for v in select_variants(["neighbours-18"])] == ["neighbours-18"]


def test_a_visium_hd_slide_trains_on_discs_of_bins_pooled_into_sites():
    """Training on 8 µm bins: a random disc of the slide, its sites and rings recomputed inside
    it; the loss falls over a few steps of the default recipe's network."""
    from histoprism.models.inputs import SlideTensors
    from histoprism.training.loop import train_step
    from histoprism.training.recipes import resolve_config

    xy = square_grid(640, 8.0)  # 6,400 bins, 100 sites of 64 µm
    rng = np.random.default_rng(0)
    state = np.sin(xy[:, :1] / 90.0) + np.cos(xy[:, 1:] / 70.0)  # tissue varying over ~100s µm
    features = np.concatenate(
        [state + rng.normal(0, 1, (len(xy), 1)), rng.normal(size=(len(xy), 7))], 1
    )
    slide = SlideTensors(
        id="hd",
        cancer="IDC",
        condition=0,
        features=torch.from_numpy(features.astype(np.float32)),
        coords_um=torch.from_numpy(xy.astype(np.float32)),
        neighbours=None,
        target=torch.from_numpy(np.repeat(state, 5, axis=1).astype(np.float32)),
        target_cols=torch.arange(5),
        spatial=spatial_plan(xy, RINGS, 64.0),
    )
    model_cfg = {**resolve_config("default")[0], "attn_dropout": 0.0}
    model = small_model(
        **{k: v for k, v in model_cfg.items() if k != "norm_first"}, fresh=True
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        crop = random_crop(slide, 2_000, np.random.default_rng(step))
        assert crop.spatial.site is not None and crop.spatial.n_sites < 60  # pooled in the disc
        losses.append(train_step(model, opt, crop.model_inputs(), crop, grad_clip=1.0))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
