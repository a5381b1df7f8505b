"""Patch encoders for ``histoprism extract``: pathology foundation models and one offline encoder.

Each encoder is a frozen :class:`EncoderConfig` in :data:`ENCODERS`. :func:`load_encoder` builds the
network the model card describes (timm, imported only then), loads a local weight file strictly and
returns an :class:`Encoder` whose ``embed`` maps uint8 RGB patches to float32 embeddings. Importing
this module imports neither timm nor any weights and opens no socket.

Data path of ``Encoder.embed``: patches (B, H, W, 3) uint8 -> resize and centre-crop to
(B, 3, S, S) float32, normalised (S = input_size) -> the network (bf16 autocast on CUDA) -> pooled
(B, D) float32. The built-in ``stain-texture`` encoder needs no weights: its 64 hand-made features
per patch live in ``stain_texture``.

Shapes: B patches, H x W pixels, D embedding dim, T tokens (CLS, registers, then patch tokens).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._core.errors import InputError
from ..io.hub import HubFile, fetch
from .stain_texture import STAIN_TEXTURE, check_patches, stain_texture_features

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0 model card
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

CONCH_V15_ARCH = "conch_v1_5"  # built here: timm ViT-L/16 trunk + attentional pooler
RESNET50_TRUNC_ARCH = "resnet50_trunc"  # timm resnet50 without layer4 and fc


@dataclass(frozen=True)
class EncoderConfig:
    name: str  # CLI name, and the folder under embeddings/
    dim: int  # embedding dimension
    input_size: int  # px fed to the network (after resize and crop)
    mean: tuple[float, float, float]  # normalisation of RGB scaled to [0, 1]
    std: tuple[float, float, float]
    mpp: float = 0.5  # µm per pixel the patches are extracted at
    patch_size: int = 224  # px extracted from the slide at `mpp`, before the resize to input_size
    arch: str = ""  # timm model name, or CONCH_V15_ARCH / RESNET50_TRUNC_ARCH / STAIN_TEXTURE
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)  # timm kwargs; layers by name
    pool: str = "cls"  # "cls" | "cls+mean" (CLS ++ mean of patch tokens) | "attn" | "avg" | "none"
    interpolation: str = "bilinear"  # resize of patches to input_size: "bilinear" | "bicubic"
    crop_pct: float = 1.0  # resize to input_size / crop_pct, then centre-crop input_size
    weights_layout: str = "timm"  # key layout of the released file: "timm" | "hf_dinov2"
    drop_keys: tuple[str, ...] = ()  # key prefixes of the released file the encoder does not use
    hub_id: str | None = None  # Hugging Face repository for --allow-download
    hub_file: str | None = None  # file to fetch from hub_id (None: timm's hf-hub loader)
    n_params: int = 0  # parameters of the network as built here (0: no network)
    licence: str = ""  # licence of the weights, in short
    reference: str = ""  # where the architecture and preprocessing come from

    @property
    def needs_weights(self) -> bool:
        return self.arch != STAIN_TEXTURE


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(kwargs)


# Architectures as the model cards and TRIDENT (mahmoodlab/TRIDENT,
# trident/patch_encoder_models/load.py) create them with timm; layer classes are named as strings
# because timm is imported only when a network is built.
ENCODERS: dict[str, EncoderConfig] = {
    c.name: c
    for c in (
        EncoderConfig(
            name="uni",
            dim=1024,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch="vit_large_patch16_224",
            arch_kwargs=_frozen(
                img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True
            ),
            hub_id="MahmoodLab/uni",
            n_params=303_350_784,
            licence="CC-BY-NC-ND-4.0, gated on Hugging Face",
            reference="huggingface.co/MahmoodLab/uni; Chen et al., Nat Med 2024",
        ),
        EncoderConfig(
            name="uni2-h",
            dim=1536,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch="vit_giant_patch14_224",
            arch_kwargs=_frozen(
                img_size=224,
                patch_size=14,
                depth=24,
                num_heads=24,
                init_values=1e-5,
                embed_dim=1536,
                mlp_ratio=2.66667 * 2,
                num_classes=0,
                no_embed_class=True,
                mlp_layer="SwiGLUPacked",
                act_layer="silu",
                reg_tokens=8,
                dynamic_img_size=True,
            ),
            hub_id="MahmoodLab/UNI2-h",
            n_params=681_394_176,
            licence="CC-BY-NC-ND-4.0, gated on Hugging Face",
            reference="huggingface.co/MahmoodLab/UNI2-h",
        ),
        EncoderConfig(
            # The TITAN patch encoder: iBOT ViT-L/16 trunk (LayerScale init 1.0) whose 1024-d tokens
            # an attentional pooler (one learned query, 8 heads) projects to 768, then LayerNorm.
            # TITAN extracts 512 px at 20x; like HEST-Benchmark we feed the common 224 px patch,
            # upsampled to 448, so that every encoder sees the same 112 µm field.
            name="conch-v1.5",
            dim=768,
            input_size=448,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch=CONCH_V15_ARCH,
            pool="attn",
            hub_id="MahmoodLab/conchv1_5",
            hub_file="pytorch_model_vision.bin",
            n_params=306_109_184,
            licence="CC-BY-NC-ND-4.0, gated on Hugging Face",
            reference=(
                "TRIDENT model_zoo/conchv1_5/conchv1_5.py (CONCHVisionTower); TITAN conch_v1_5 config;"
                " Ding et al., arXiv 2411.19666"
            ),
        ),
        EncoderConfig(
            # The Prov-GigaPath tile encoder: timm's DINOv2 ViT-g with patch 16 at 224 px.
            name="gigapath",
            dim=1536,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch="vit_giant_patch14_dinov2",
            arch_kwargs=_frozen(
                img_size=224,
                in_chans=3,
                patch_size=16,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                init_values=1e-5,
                mlp_ratio=5.33334,
                num_classes=0,
            ),
            interpolation="bicubic",
            crop_pct=224 / 256,  # model card: Resize(256, bicubic), CenterCrop(224)
            hub_id="prov-gigapath/prov-gigapath",
            n_params=1_134_953_984,
            licence="Apache-2.0, gated on Hugging Face",
            reference="huggingface.co/prov-gigapath/prov-gigapath; Xu et al., Nature 2024",
        ),
        EncoderConfig(
            # ViT-H/14, SwiGLU, 4 registers; embedding = CLS ++ mean of the 256 patch tokens.
            name="virchow2",
            dim=2560,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch="vit_huge_patch14_224",
            arch_kwargs=_frozen(
                img_size=224,
                init_values=1e-5,
                num_classes=0,
                reg_tokens=4,
                mlp_ratio=5.3375,
                global_pool="",
                dynamic_img_size=True,
                mlp_layer="SwiGLUPacked",
                act_layer="silu",
            ),
            pool="cls+mean",
            interpolation="bicubic",
            hub_id="paige-ai/Virchow2",
            n_params=631_239_424,
            licence="CC-BY-NC-ND-4.0, gated on Hugging Face",
            reference="huggingface.co/paige-ai/Virchow2; Zimmermann et al., arXiv 2408.00738",
        ),
        EncoderConfig(
            name="h-optimus-0",
            dim=1536,
            input_size=224,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            arch="vit_giant_patch14_reg4_dinov2",
            arch_kwargs=_frozen(
                img_size=224,
                init_values=1e-5,
                num_classes=0,
                global_pool="token",
                dynamic_img_size=False,
            ),
            hub_id="bioptimus/H-optimus-0",
            n_params=1_134_774_272,
            licence="Apache-2.0",
            reference="huggingface.co/bioptimus/H-optimus-0",
        ),
        EncoderConfig(
            # Released as a transformers Dinov2Model (ViT-L/16, LayerScale, no registers); its keys
            # are mapped onto the same timm ViT-L/16. Embedding = CLS of last_hidden_state.
            name="phikon-v2",
            dim=1024,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch="vit_large_patch16_224",
            arch_kwargs=_frozen(img_size=224, patch_size=16, init_values=1e-5, num_classes=0),
            interpolation="bicubic",  # its image processor: resample=3 (bicubic)
            weights_layout="hf_dinov2",
            hub_id="owkin/phikon-v2",
            hub_file="model.safetensors",
            n_params=303_350_784,
            licence="Owkin non-commercial licence (see the model card)",
            reference="huggingface.co/owkin/phikon-v2; Filiot et al., arXiv 2409.09173",
        ),
        EncoderConfig(
            # CLAM / HEST "resnet50_trunc": ImageNet ResNet-50 up to layer3, global average pool.
            name="resnet50",
            dim=1024,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch=RESNET50_TRUNC_ARCH,
            pool="avg",
            drop_keys=("layer4.", "fc."),
            hub_id="timm/resnet50.tv_in1k",
            n_params=8_543_296,
            licence="BSD-3-Clause (torchvision ImageNet weights)",
            reference="CLAM resnet_custom.resnet50_baseline; TRIDENT ResNet50InferenceEncoder",
        ),
        EncoderConfig(
            name=STAIN_TEXTURE,
            dim=64,
            input_size=112,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            arch=STAIN_TEXTURE,
            pool="none",
            licence="Apache-2.0 (part of histoprism)",
            reference="histoprism.images.stain_texture",
        ),
    )
}


def encoder_names() -> list[str]:
    """Names accepted by ``--encoder``, registry order."""
    return list(ENCODERS)


def get_config(name: str) -> EncoderConfig:
    """The registered config of ``name``; an unknown name raises InputError listing the known ones."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise InputError(
            f"unknown encoder {name!r}; known encoders: {', '.join(encoder_names())}"
        ) from None


# --- networks ---------------------------------------------------------------------------------


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise InputError(
            f"the pathology encoders need timm ({err}); pip install 'histoprism[encoders]'"
        ) from None
    return timm


class AttentionalPooler(nn.Module):
    """Cross-attention from ``n_queries`` learned queries to the trunk's tokens (CoCa / CONCH)."""

    def __init__(self, dim: int, context_dim: int, n_heads: int = 8, n_queries: int = 1):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.n_heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, D)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, T, D) each
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, *, D/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Q, D/h)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, Q, D)


def _dino_interpolate_pos(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Position embeddings (1, 1 + g*g, D) for a grid x grid input, as DINO/iBOT interpolate them
    (bicubic, scale factor (grid + 0.1) / g): what CONCH v1.5's reference forward does."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(patch_pos.shape[1])
    if g == grid:
        return pos_embed
    patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    scale = (grid + 0.1) / g
    patch_pos = F.interpolate(patch_pos, scale_factor=(scale, scale), mode="bicubic")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # (1, grid², D)
    return torch.cat([cls_pos, patch_pos], dim=1)


class ConchV15VisionTower(nn.Module):
    """CONCH v1.5 image tower: ViT-L/16 trunk -> attentional pooler (1024 -> 768) -> LayerNorm.

    The trunk keeps its 224 px (14 x 14) position embeddings and interpolates them to the input
    grid at every forward, as the released model does at 448 px. State-dict keys match the released
    ``pytorch_model_vision.bin``: ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``.
    """

    def __init__(self, trunk: nn.Module, dim: int = 768, context_dim: int = 1024):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, context_dim, n_heads=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed.proj(x)  # (B, 1024, h, w)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, 1024)
        x = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, 1024)
        x = x + _dino_interpolate_pos(t.pos_embed, grid)
        x = t.norm(t.blocks(x))
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])  # (B, 768)


def _timm_kwargs(config: EncoderConfig, timm) -> dict[str, Any]:
    kwargs = dict(config.arch_kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    return kwargs


def _build_network(config: EncoderConfig) -> nn.Module:
    """The encoder's network with timm's initialisation, on the current default device."""
    timm = _import_timm()
    if config.arch == CONCH_V15_ARCH:
        trunk = timm.create_model(
            "vit_large_patch16_224", img_size=224, init_values=1.0, num_classes=0
        )
        return ConchV15VisionTower(trunk)
    if config.arch == RESNET50_TRUNC_ARCH:
        net = timm.create_model("resnet50", num_classes=0)  # torchvision's layout and key names
        net.layer4 = nn.Identity()  # layer3 (1024 channels) -> global average pool
        return net
    return timm.create_model(config.arch, pretrained=False, **_timm_kwargs(config, timm))


def _fill_random_(net: nn.Module, seed: int) -> None:
    """Cheap seeded values: weights ~ N(0, 0.02) tiled from one 16M-value pool, norms weight 1 and
    bias 0. Pool values are bf16-representable, so a bf16 copy of the weights is exact."""
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2**24 + 3, generator=g) * 0.02).to(torch.bfloat16).float()
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        for module in net.modules():
            tensors = list(module.named_parameters(recurse=False))
            tensors += list(module.named_buffers(recurse=False))
            for name, t in tensors:
                if isinstance(module, norms) and name in ("weight", "running_var"):
                    t.fill_(1.0)
                elif isinstance(module, norms) or not t.is_floating_point():
                    t.zero_()
                else:
                    _tile_(t.view(-1), pool, int(torch.randint(pool.numel(), (1,), generator=g)))


def _tile_(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    i, n = 0, flat.numel()
    while i < n:
        k = min(n - i, pool.numel() - offset)
        flat[i : i + k].copy_(pool[offset : offset + k])
        i, offset = i + k, 0


def build_architecture(name: str, *, seed: int = 0) -> nn.Module:
    """The true network of encoder ``name`` with seeded random weights, on the CPU, in eval mode.

    Built on the meta device and filled with cheap random values (timm's own initialisation of a
    ViT-g takes ~20 s); for tests and for checking a weight file's layout.
    """
    config = get_config(name)
    if not config.needs_weights:
        raise InputError(f"encoder {name!r} has no network")
    with torch.device("meta"):
        net = _build_network(config)
    net = net.to_empty(device="cpu")
    _fill_random_(net, seed)
    return net.eval()


# --- weight files -----------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "net")
_PREFIXES = (
    "module.",
    "model.",
    "_orig_mod.",
    "backbone.",
    "visual.",
    "trunk.",
    "encoder.",
    "dinov2.",
    "teacher.",
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_vision.bin")


def _resolve_weights(path: Path, config: EncoderConfig) -> Path:
    """A weight file, or a downloaded repository folder holding one of the usual names."""
    if path.is_dir():
        names = ([config.hub_file] if config.hub_file else []) + list(_WEIGHT_FILES)
        for candidate in names:
            if (path / candidate).is_file():
                return path / candidate
        raise InputError(f"no weight file ({', '.join(names)}) in this folder", path)
    if not path.is_file():
        raise InputError("weights file not found", path)
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch (.bin/.pth/.pt) file, unwrapped from common nesting."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = _torch_load(path)
    except InputError:
        raise
    except Exception as err:  # corrupt file, not a checkpoint, pickled objects refused
        raise InputError(_read_error(err), path) from None
    for _ in range(3):  # {"model": {"state_dict": {...}}} at most
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise InputError("no state dict (name -> tensor) in this file", path)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_error(err: Exception) -> str:
    """One line for a file torch or safetensors cannot read (torch's own messages span lines)."""
    text = " ".join(str(err).split())
    if "WeightsUnpickler error:" in text:  # torch.load(weights_only=True) refused the pickle
        reason = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0]
        if "Unsupported global" in reason:
            what = reason.split(" was not an allowed global")[0].strip()[:100]
            return (
                f"the checkpoint pickles Python objects besides tensors ({what}), "
                "which are not loaded (untrusted code); save its state dict alone or as .safetensors"
            )
        return f"cannot read weights: not a PyTorch checkpoint ({reason.strip()[:100]})"
    return f"cannot read weights: {type(err).__name__}: {text[:200]}"


def _torch_load(path: Path) -> Any:
    try:  # memory-mapped: a 4.5 GB checkpoint is not read twice
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy format


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``visual.`` ...) that every key shares
    and no key of the network has; repeated, so ``module.model.`` goes too."""
    while not set(sd) <= model_keys:
        prefix = next(
            (
                p
                for p in _PREFIXES
                if all(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in model_keys)
            ),
            None,
        )
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def hf_dinov2_to_timm(sd: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Map a transformers ``Dinov2Model`` state dict (MLP variant, no registers) onto timm's
    VisionTransformer keys: q, k, v are stacked into ``qkv``, ``lambda1`` becomes ``gamma``.

    Position embeddings for another grid are resampled to ``grid`` x ``grid`` as transformers does
    at run time (bicubic to the target size). Keys this does not know are kept, so that a strict
    load reports them. ``mask_token`` (training only) is dropped.
    """
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
        "layernorm.": "norm.",
        "attention.output.dense.": "attn.proj.",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "embeddings.mask_token":
            continue
        new = key.replace("encoder.layer.", "blocks.", 1) if key.startswith("encoder.") else key
        parts = new.split(".")
        if len(parts) == 6 and parts[2:4] == [
            "attention",
            "attention",
        ]:  # blocks.i.attention.attention.query.weight
            qkv.setdefault(f"{parts[0]}.{parts[1]}.attn.qkv.{parts[5]}", {})[parts[4]] = value
            continue
        for old, repl in renames.items():
            new = new.replace(old, repl)
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        else:
            out.update({f"{key}.{n}": t for n, t in parts.items()})  # incomplete: let it fail
    if "pos_embed" in out:
        out["pos_embed"] = _resample_hf_pos(out["pos_embed"], grid)
    return out


def _resample_hf_pos(pos: torch.Tensor, grid: int) -> torch.Tensor:
    g = math.isqrt(pos.shape[1] - 1)
    if g == grid or g * g != pos.shape[1] - 1:
        return pos
    patch = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos[:, :1], patch], dim=1)


def _adapt_state_dict(
    sd: dict[str, torch.Tensor], config: EncoderConfig, model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Released-file layout -> the network's keys: prefixes, HF naming, unused heads."""
    sd = _strip_prefixes(sd, model_keys)
    if config.weights_layout == "hf_dinov2" and "embeddings.cls_token" in sd:
        sd = hf_dinov2_to_timm(sd, config.input_size // config.arch_kwargs["patch_size"])
    if config.drop_keys:
        sd = {k: v for k, v in sd.items() if not k.startswith(config.drop_keys)}
    pos = sd.get("trunk.pos_embed")
    if config.arch == CONCH_V15_ARCH and pos is not None and pos.shape[1] != 197:
        # the reference loader resizes a checkpoint's grid to 14 x 14 (bilinear, no antialias)
        timm = _import_timm()
        sd["trunk.pos_embed"] = timm.layers.resample_abs_pos_embed(
            pos.float(), (14, 14), num_prefix_tokens=1, interpolation="bilinear", antialias=False
        )
    return sd


def _check_keys(net: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """Strict match of names and shapes, as one InputError line that counts the differences."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        shapes = f"{tuple(sd[k].shape)} in file, {tuple(expected[k].shape)} expected"
        problems.append(f"{len(wrong)} shape mismatches (e.g. {k}: {shapes})")
    raise InputError(
        f"not {name} weights: {'; '.join(problems)} (of {len(expected)} tensors)", path
    )


def load_weights(config: EncoderConfig, weights: str | Path) -> nn.Module:
    """The network of ``config`` with the tensors of a local weight file, strictly, on the CPU.

    The network is built on the meta device and takes the file's tensors as its own (cast to
    float32), so a 1.1 B-parameter model is not held twice.
    """
    path = _resolve_weights(Path(weights), config)
    with torch.device("meta"):
        net = _build_network(config)
    sd = _adapt_state_dict(_read_state_dict(path), config, set(net.state_dict()))
    _check_keys(net, sd, path, config.name)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        raise InputError(f"{config.name}: the network has tensors no weight file provides", path)
    log.info("%s: loaded %d tensors from %s", config.name, len(sd), path)
    return net.eval()


def _download(config: EncoderConfig) -> nn.Module:
    """Weights from the Hugging Face hub (network, token and accepted licence needed).

    The only network access of the package: reached from ``load_encoder`` with
    ``allow_download=True`` (``--allow-download``) alone.
    """
    timm = _import_timm()
    if config.hub_file is not None:
        fetched = fetch(HubFile(config.hub_id, config.hub_file), allow_download=True)
        return load_weights(config, fetched.path)
    if config.arch == RESNET50_TRUNC_ARCH:
        net = timm.create_model(f"hf-hub:{config.hub_id}", pretrained=True, num_classes=0)
        net.layer4 = nn.Identity()
        return net.eval()
    kwargs = _timm_kwargs(config, timm)
    return timm.create_model(f"hf-hub:{config.hub_id}", pretrained=True, **kwargs).eval()


# --- encoders ---------------------------------------------------------------------------------


class Encoder:
    """Uint8 RGB patches -> embeddings, with the preprocessing and pooling of ``config``.

    ``model`` is the network (None for ``stain-texture``). On CUDA the forward runs under bf16
    autocast unless ``autocast=False``; on the CPU in float32.
    """

    def __init__(
        self,
        config: EncoderConfig,
        model: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        autocast: bool = True,
    ):
        if config.needs_weights and model is None:
            raise InputError(f"encoder {config.name!r} needs a network")
        self.config = config
        self.dim = config.dim
        self.device = torch.device(device)
        self.model = None if model is None else model.to(self.device).eval()
        self.autocast = autocast and self.device.type == "cuda"
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(config.mean, device=self.device).view(shape)
        self._std = torch.tensor(config.std, device=self.device).view(shape)

    def embed(self, patches: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, dim) float32, ``batch_size`` patches per forward."""
        patches = check_patches(patches)
        if self.model is None:
            return stain_texture_features(patches)
        chunks = [
            self._forward(self._preprocess(patches[i : i + batch_size]))
            for i in range(0, len(patches), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _preprocess(self, patches: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) normalised float32, S = input_size."""
        c = self.config
        x = torch.from_numpy(np.ascontiguousarray(patches)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()  # (B, 3, H, W), 0..255
        size = round(c.input_size / c.crop_pct)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode=c.interpolation, antialias=True)
            x = x.clamp_(0, 255)  # bicubic overshoots; PIL-based pipelines clip to uint8
        if size != c.input_size:
            top = (size - c.input_size) // 2
            x = x[..., top : top + c.input_size, top : top + c.input_size]
        return (x / 255 - self._mean) / self._std

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> np.ndarray:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with amp:
            if self.config.pool == "cls+mean":
                tokens = self.model.forward_features(x)  # (B, T, D) after the final norm
                prefix = self.model.num_prefix_tokens  # CLS + registers
                z = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)  # (B, 2D)
            else:
                z = self.model(x)  # (B, D): CLS, attentional pool or average pool
        return z.float().cpu().numpy()


def load_encoder(
    name: str,
    weights: str | Path | None = None,
    *,
    allow_download: bool = False,
    device: str | torch.device = "cpu",
) -> Encoder:
    """The encoder ``name`` with weights from a local file (``.safetensors``, ``.bin``, ``.pth``,
    ``.pt``, or a downloaded repository folder), or from the Hugging Face hub if
    ``allow_download``. A file that does not fit the architecture raises InputError.
    """
    config = get_config(name)
    if not config.needs_weights:
        if weights is not None:
            raise InputError(f"encoder {name!r} is built in and takes no weights", weights)
        return Encoder(config, device=device)
    if weights is not None:
        model = load_weights(config, weights)
    elif allow_download:
        model = _download(config)
    else:
        raise InputError(
            f"encoder {name!r} needs its weights: pass --weights PATH (a local copy of "
            f"huggingface.co/{config.hub_id}) or --allow-download; or use the offline "
            f"{STAIN_TEXTURE!r} encoder"
        )
    return Encoder(config, model, device=device)
