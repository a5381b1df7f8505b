"""Encoder registry: each network loads a saved file of its true architecture; stain-texture
carries signal.

The foundation-model weights cannot be downloaded here, so every test builds the true network with
random weights (``build_architecture``), writes it in the layout of the released file and loads it
back through ``load_encoder``. The large networks (four of 0.6-1.1 B parameters, and CONCH v1.5 at
448 px) run one 1-patch forward and compare sampled tensors instead of a second forward, to keep
this file near two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoprism._core.errors import InputError
from histoprism.images import encoders as enc
from histoprism.images import stain_texture as stx
from histoprism.images.encoders import ENCODERS, Encoder, build_architecture, load_encoder

REAL_TILE = Path("/work/shared/data/images/tiatoolbox_he_tile_1000px.png")

# Parameters of each network as built with timm 1.0 (model cards: UNI 303 M, UNI2-h 681 M,
# Virchow2 632 M, Prov-GigaPath 1.13 B, H-optimus-0 1.1 B, Phikon-v2 ViT-L)
EXPECTED_PARAMS = {
    "uni": 303_350_784,  # ViT-L/16
    "uni2-h": 681_394_176,  # ViT, 1536 wide, 24 blocks, SwiGLU, 8 registers
    "conch-v1.5": 306_109_184,  # ViT-L/16 trunk + attentional pooler (2,758,400)
    "gigapath": 1_134_953_984,  # ViT-g/16, SwiGLU
    "virchow2": 631_239_424,  # ViT-H/14, SwiGLU, 4 registers
    "h-optimus-0": 1_134_774_272,  # ViT-g/14, SwiGLU, 4 registers
    "phikon-v2": 303_350_784,  # ViT-L/16
    "resnet50": 8_543_296,  # ResNet-50 without layer4 and fc (full: 25,557,032)
}
# > 600 M parameters, or 448 px input (CONCH v1.5: 785 tokens)
LARGE = ("conch-v1.5", "uni2-h", "virchow2", "gigapath", "h-optimus-0")
NETWORKS = [name for name, c in ENCODERS.items() if c.needs_weights]


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    """The session runs torch on one thread; the big forwards here take both cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


@pytest.fixture
def weights_dir(tmp_path):
    """A folder for weight files: in RAM (/dev/shm) when it has room, because writing gigabytes
    to disk is the slowest step here; removed after the test."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8e9):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="histoprism-test-encoders-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _patches(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --- the registry -----------------------------------------------------------------------------


def test_registry_names_and_dims():
    assert enc.encoder_names() == [
        "uni", "uni2-h", "conch-v1.5", "gigapath", "virchow2", "h-optimus-0", "phikon-v2",
        "resnet50", "stain-texture",
    ]  # fmt: skip
    dims = {name: c.dim for name, c in ENCODERS.items()}
    assert dims == {
        "uni": 1024, "uni2-h": 1536, "conch-v1.5": 768, "gigapath": 1536, "virchow2": 2560,
        "h-optimus-0": 1536, "phikon-v2": 1024, "resnet50": 1024, "stain-texture": 64,
    }  # fmt: skip
    for c in ENCODERS.values():
        assert c.mpp == 0.5 and c.patch_size == 224 and len(c.mean) == len(c.std) == 3
        assert c.n_params == EXPECTED_PARAMS.get(c.name, 0)
        assert c.licence and c.reference
        assert c.hub_id or not c.needs_weights


def test_import_loads_no_timm():
    code = "import sys, histoprism.images.encoders; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, histoprism.images.stain_texture; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- loading saved files of the true architectures --------------------------------------------


def _timm_to_hf_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the released Phikon-v2 layout, written independently of the loader's mapping."""
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1]),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[t + f"attn.qkv.{kind}"].chunk(3)
            hf[h + f"attention.attention.query.{kind}"] = q
            hf[h + f"attention.attention.key.{kind}"] = k
            hf[h + f"attention.attention.value.{kind}"] = v
            hf[h + f"attention.output.dense.{kind}"] = sd[t + f"attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[h + f"{n}.{kind}"] = sd[t + f"{n}.{kind}"]
        hf[h + "layer_scale1.lambda1"] = sd[t + "ls1.gamma"]
        hf[h + "layer_scale2.lambda1"] = sd[t + "ls2.gamma"]
    return hf


def _torchvision_resnet50_layout(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full torchvision ResNet-50 state dict (layer4, fc) whose first three stages are ``net``'s."""
    torchvision = pytest.importorskip("torchvision")
    full = torchvision.models.resnet50(weights=None)
    missing, unexpected = full.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("layer4.", "fc.")) for k in missing)
    return full.state_dict()


def _save(name: str, net: torch.nn.Module, folder: Path) -> Path:
    """The network's weights in the layout (and a format) its released file uses, or a variant.

    The large networks are stored as bf16 (exact: build_architecture's values are bf16 numbers),
    converted in place so that a 4.5 GB network is never held twice.
    """
    from safetensors.torch import save_file

    if name in LARGE and name != "conch-v1.5":
        net.to(torch.bfloat16)
    sd = net.state_dict()
    if name == "uni":  # a fine-tuning checkpoint: nested, DataParallel prefix, .pth
        path = folder / "uni_finetuned.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif name == "phikon-v2":  # transformers Dinov2Model, model.safetensors
        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in _timm_to_hf_dinov2(sd).items()}, path)
    elif name == "resnet50":  # torchvision ImageNet layout, layer4 and fc included
        path = folder / "resnet50.safetensors"
        save_file(_torchvision_resnet50_layout(net), path)
    elif name == "conch-v1.5":  # pytorch_model_vision.bin: trunk.*, attn_pool_contrast.*
        path = folder / "pytorch_model_vision.bin"
        torch.save(sd, path)
    elif name in ("gigapath", "h-optimus-0"):
        path = folder / "pytorch_model.bin"
        torch.save(sd, path)
    else:
        path = folder / "model.safetensors"
        save_file(sd, path)
    return path


def _samples(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().flatten()[::7919].clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", [n for n in NETWORKS if n not in LARGE])
def test_loads_saved_weights(name, weights_dir, timm):
    config = ENCODERS[name]
    net = build_architecture(name, seed=1)
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS[name]
    patches = _patches(2, config.patch_size)
    expected = Encoder(config, net).embed(patches)
    path = _save(name, net, weights_dir)
    del net
    encoder = load_encoder(name, weights=path)
    out = encoder.embed(patches)
    assert encoder.dim == config.dim and out.shape == (2, config.dim) and out.dtype == np.float32
    assert np.isfinite(out).all() and not np.allclose(out[0], out[1])
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_loads_saved_weights_large(name, weights_dir, timm):
    """One 1-patch forward of the loaded encoder; the weights compared by sampled tensors."""
    config = ENCODERS[name]
    net = build_architecture(name, seed=1)
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS[name]
    saved = _samples(net)
    path = _save(name, net, weights_dir)
    del net
    gc.collect()
    encoder = load_encoder(name, weights=path)
    loaded = _samples(encoder.model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    out = encoder.embed(_patches(1, config.patch_size))
    assert out.shape == (1, config.dim) and np.isfinite(out).all() and out.std() > 0
    del encoder
    gc.collect()
    path.unlink()


def test_resnet50_is_torchvision_up_to_layer3(timm):
    """resnet50_trunc: torchvision's ResNet-50 through layer3, then a global average pool."""
    torchvision = pytest.importorskip("torchvision")
    net = build_architecture("resnet50", seed=2)
    full = torchvision.models.resnet50(weights=None)
    full.load_state_dict(_torchvision_resnet50_layout(net))
    full.eval()
    encoder = Encoder(ENCODERS["resnet50"], net)
    patches = _patches(2)
    x = encoder._preprocess(patches)
    with torch.inference_mode():
        stem = full.maxpool(full.relu(full.bn1(full.conv1(x))))
        expected = full.layer3(full.layer2(full.layer1(stem))).mean((2, 3))  # (B, 1024)
    np.testing.assert_allclose(encoder.embed(patches), expected.numpy(), atol=1e-4, rtol=1e-4)


def _hf_dinov2_cls(hf: dict[str, torch.Tensor], x: torch.Tensor, heads: int, patch: int):
    """CLS of a transformers Dinov2Model forward, written from its modeling code, in plain torch."""
    e = F.conv2d(x, hf["embeddings.patch_embeddings.projection.weight"],
                 hf["embeddings.patch_embeddings.projection.bias"], stride=patch)  # fmt: skip
    e = torch.cat([hf["embeddings.cls_token"].expand(len(x), -1, -1), e.flatten(2).mT], 1)
    pos = hf["embeddings.position_embeddings"]
    g, grid = math.isqrt(pos.shape[1] - 1), x.shape[-1] // patch
    if g != grid:  # transformers interpolates at run time: bicubic to the new grid
        p = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], p.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)
    h = e + pos
    dim = h.shape[-1]
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in hf:
        p = f"encoder.layer.{i}."

        def lin(z, name, p=p):
            return F.linear(z, hf[p + name + ".weight"], hf[p + name + ".bias"])

        z = F.layer_norm(h, (dim,), hf[p + "norm1.weight"], hf[p + "norm1.bias"], 1e-6)
        q, k, v = (lin(z, f"attention.attention.{n}").unflatten(-1, (heads, -1)).transpose(1, 2)
                   for n in ("query", "key", "value"))  # fmt: skip
        att = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), -1) @ v  # (B, heads, T, d)
        h = (
            h
            + lin(att.transpose(1, 2).flatten(2), "attention.output.dense")
            * hf[p + "layer_scale1.lambda1"]
        )
        z = F.layer_norm(h, (dim,), hf[p + "norm2.weight"], hf[p + "norm2.bias"], 1e-6)
        h = h + lin(F.gelu(lin(z, "mlp.fc1")), "mlp.fc2") * hf[p + "layer_scale2.lambda1"]
        i += 1
    return F.layer_norm(h, (dim,), hf["layernorm.weight"], hf["layernorm.bias"], 1e-6)[:, 0]


@pytest.mark.parametrize("hf_image_size", [32, 64])
def test_hf_dinov2_mapping_matches_a_transformers_forward(hf_image_size, timm):
    """A tiny Dinov2 in transformers' layout gives the same CLS through the mapped timm ViT, also
    when its position embeddings are for another image size (Dinov2 configs often say 518)."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, init_values=0.5)
    torch.manual_seed(0)
    source = timm.models.VisionTransformer(**{**kwargs, "img_size": hf_image_size}, num_classes=0)
    with torch.no_grad():
        for t in source.parameters():
            t.normal_(0, 0.2)
    hf = _timm_to_hf_dinov2(source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = _hf_dinov2_cls(hf, x, heads=4, patch=8)
    tiny = timm.models.VisionTransformer(**kwargs, num_classes=0).eval()
    tiny.load_state_dict(enc.hf_dinov2_to_timm(hf, grid=4), strict=True)
    with torch.inference_mode():
        got = tiny.forward_features(x)[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_conch_pooler_and_position_embeddings(timm):
    """The attentional pooler is multi-head cross-attention from one learned query (CoCa); the
    tower's forward is timm's at the native grid; position embeddings stay at 14 x 14 (a file's
    other grid is resized on load) and are interpolated to the 28 x 28 grid of 448 px."""
    torch.manual_seed(0)
    pool = enc.AttentionalPooler(dim=16, context_dim=24, n_heads=4, n_queries=1)
    with torch.no_grad():
        for t in pool.parameters():
            t.normal_()
    x = torch.randn(3, 10, 24)
    q = pool.to_q(F.layer_norm(pool.query, (16,), pool.ln_q.weight, pool.ln_q.bias))  # (1, 16)
    k, v = pool.to_kv(F.layer_norm(x, (24,), pool.ln_k.weight, pool.ln_k.bias)).chunk(2, -1)
    heads = []
    for h in range(4):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(torch.einsum("qd,btd->bqt", q[:, s], k[..., s]) / 2.0, -1)
        heads.append(torch.einsum("bqt,btd->bqd", w, v[..., s]))
    expected = pool.to_out(torch.cat(heads, -1))  # (B, 1, 16)
    torch.testing.assert_close(pool(x), expected, atol=1e-5, rtol=1e-5)

    trunk = timm.models.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=4,
        init_values=1.0,
        num_classes=0,
    )
    tower = enc.ConchV15VisionTower(trunk, dim=16, context_dim=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = tower.ln_contrast(
            tower.attn_pool_contrast(trunk.forward_features(images))[:, 0]
        )
        torch.testing.assert_close(tower(images), reference)
        assert tower(torch.randn(1, 3, 64, 64)).shape == (1, 16)  # 8 x 8 grid, interpolated

    pos = torch.randn(1, 197, 8)
    assert enc._dino_interpolate_pos(pos, 14) is pos
    big = enc._dino_interpolate_pos(pos, 28)
    assert big.shape == (1, 785, 8) and torch.equal(big[:, 0], pos[:, 0])
    keys = {"trunk.pos_embed"}
    resized = enc._adapt_state_dict({"trunk.pos_embed": big}, ENCODERS["conch-v1.5"], keys)
    assert resized["trunk.pos_embed"].shape == (1, 197, 8)


# --- bad input --------------------------------------------------------------------------------


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(InputError, match=r"unknown encoder 'unii'.*uni, uni2-h, conch-v1.5"):
        load_encoder("unii")


def test_network_without_weights_says_how_to_get_them():
    with pytest.raises(InputError, match=r"--weights PATH.*--allow-download"):
        load_encoder("uni")
    with pytest.raises(InputError, match="not found"):
        load_encoder("uni", weights="/nonexistent/uni.bin")


def test_wrong_architecture_names_the_file(tmp_path, timm):
    from safetensors.torch import save_file

    sd = build_architecture("resnet50").state_dict()
    path = tmp_path / "resnet.safetensors"
    save_file(sd, path)
    expected = r"resnet\.safetensors: not uni weights: \d+ missing keys"
    with pytest.raises(InputError, match=expected) as err:
        load_encoder("uni", weights=path)
    assert "unexpected keys" in str(err.value) and "\n" not in str(err.value)

    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    bad = tmp_path / "bad_conv1.safetensors"
    save_file(sd, bad)
    with pytest.raises(InputError, match=r"bad_conv1.*1 shape mismatches \(e\.g\. conv1\.weight"):
        load_encoder("resnet50", weights=bad)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pth: cannot read weights"):
        load_encoder("resnet50", weights=junk)

    pickled = tmp_path / "with_args.pth"
    torch.save({"args": argparse.Namespace(lr=1e-3), "model": sd}, pickled)
    with pytest.raises(InputError, match=r"with_args\.pth: the checkpoint pickles Python objects"):
        load_encoder("resnet50", weights=pickled)


def test_weights_folder_and_builtin_without_weights(tmp_path, timm):
    from safetensors.torch import save_file

    save_file(
        _torchvision_resnet50_layout(build_architecture("resnet50")), tmp_path / "model.safetensors"
    )
    assert load_encoder("resnet50", weights=tmp_path).dim == 1024
    with pytest.raises(InputError, match="takes no weights"):
        load_encoder("stain-texture", weights=tmp_path / "model.safetensors")


def test_missing_timm_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(InputError, match=r"pip install 'histoprism\[encoders\]'"):
        build_architecture("uni")


def test_patches_must_be_uint8_rgb():
    encoder = load_encoder("stain-texture")
    with pytest.raises(InputError, match="uint8"):
        encoder.embed(np.zeros((2, 224, 224, 3), np.float32))
    with pytest.raises(InputError, match=r"\(B, H, W, 3\)"):
        encoder.embed(np.zeros((224, 224, 3), np.uint8))


# --- stain-texture ----------------------------------------------------------------------------


def _he_patch(n_nuclei: int, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Eosin-pink background with ``n_nuclei`` non-overlapping hematoxylin discs (radius 4-8 px)."""
    img = np.empty((size, size, 3))
    img[:] = (236, 172, 204)
    img += rng.normal(0, 6, img.shape)
    yy, xx = np.mgrid[:size, :size]
    centres: list[tuple[float, float, float]] = []
    while len(centres) < n_nuclei:
        r = rng.uniform(4, 8)
        cy, cx = rng.uniform(r + 1, size - r - 1, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + s + 4) ** 2 for y, x, s in centres):
            centres.append((cy, cx, r))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disc] = np.array((84, 44, 134)) + rng.normal(0, 8, (disc.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_stain_texture_shape_finite_deterministic():
    rng = np.random.default_rng(0)
    patches = np.stack([_he_patch(k, rng) for k in (0, 5, 20)] + [
        np.full((224, 224, 3), 255, np.uint8),  # glass
        np.zeros((224, 224, 3), np.uint8),  # black
    ])  # fmt: skip
    encoder = load_encoder("stain-texture")
    out = encoder.embed(patches)
    assert out.shape == (5, 64) == (5, len(stx.STAIN_TEXTURE_FEATURES)) and out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, encoder.embed(patches))
    np.testing.assert_array_equal(out[1:2], encoder.embed(patches[1:2]))  # batch-independent
    odd = stx.stain_texture_features(patches[:, :150, :150])  # resized, not block-averaged
    assert odd.shape == (5, 64) and np.isfinite(odd).all()
    named = dict(zip(stx.STAIN_TEXTURE_FEATURES, out[3], strict=True))
    assert named["tissue_frac"] == 0 and named["nuc_log_count"] == 0  # glass has no tissue


def test_stain_texture_counts_nuclei():
    rng = np.random.default_rng(1)
    counts = np.repeat(np.arange(0, 31, 3), 2)  # 0, 0, 3, 3, ..., 30, 30
    features = stx.stain_texture_features(np.stack([_he_patch(k, rng) for k in counts]))
    named = dict(zip(stx.STAIN_TEXTURE_FEATURES, features.T, strict=True))
    found = np.expm1(named["nuc_log_count"])
    assert np.corrcoef(found, counts)[0, 1] > 0.95
    assert np.corrcoef(named["nuc_area_frac"], counts)[0, 1] > 0.95
    assert found[counts == 0].max() == 0  # no nuclei in plain eosin


def test_stain_texture_blocks_match_skimage():
    """The vectorised deconvolution, co-occurrence, LBP and Otsu equal skimage's per image."""
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(2)
    rgb = stx._to_work_size(np.stack([_he_patch(k, rng) for k in (2, 12, 25)]))  # (3, 3, h, w)
    grey = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    props = stx.glcm_props(grey)
    codes = stx.lbp_codes(np.round(grey * 255))
    hem = rgb2hed(rgb.transpose(0, 2, 3, 1))[..., 0]
    for i in range(3):
        q = np.minimum(grey[i] * 32, 31).astype(np.uint8)
        glcm = graycomatrix(q, (1, 2), stx.GLCM_ANGLES, levels=32, symmetric=True, normed=True)
        names = ("contrast", "homogeneity", "energy", "correlation")
        expected = np.stack([graycoprops(glcm, p).mean(1) for p in names], 1).ravel()
        np.testing.assert_allclose(props[i], expected, rtol=1e-9, atol=1e-12)
        ref = local_binary_pattern(np.round(grey[i] * 255).astype(np.uint8), 8, 1, "uniform")
        assert (codes[i] == ref).mean() > 0.99
        assert stx._otsu(hem[i : i + 1])[0] == pytest.approx(threshold_otsu(hem[i]))


@pytest.mark.skipif(not REAL_TILE.exists(), reason="real H&E tile not available")
def test_stain_texture_on_real_he_tile():
    from PIL import Image

    tile = np.asarray(Image.open(REAL_TILE).convert("RGB"))
    crops = np.stack(
        [tile[y : y + 224, x : x + 224] for y in range(0, 776, 112) for x in range(0, 776, 112)]
    )
    start = time.perf_counter()
    features = stx.stain_texture_features(crops)
    ms = (time.perf_counter() - start) / len(crops) * 1e3
    print(f"stain-texture: {ms:.2f} ms per 224 px patch ({len(crops)} patches)")
    assert ms < 25  # ~3 ms on one core; a per-pixel Python loop would be far slower
    assert np.isfinite(features).all()
    varying = features.std(0) > 1e-4 * (np.abs(features).mean(0) + 1e-6)
    assert varying.mean() > 0.9
    named = dict(zip(stx.STAIN_TEXTURE_FEATURES, features.T, strict=True))
    assert (named["nuc_log_count"] > 0).all() and (named["tissue_frac"] > 0.5).all()
