"""Patch encoders for ``histoprism extract``: pathology foundation models and one offline encoder.

Each encoder is a frozen :class:`EncoderConfig` in :data:`ENCODERS`. :func:`load_encoder` builds the
network the model card describes (timm, imported only then), loads a local weight file strictly and
returns an :class:`Encoder` whose ``embed`` maps uint8 RGB patches to float32 embeddings. Importing
this module imports neither timm nor any weights and opens no socket.

The built-in ``stain-texture`` encoder needs no weights: 64 hand-made features per patch (colour,
colour deconvolution, a nuclei proxy, grey-level co-occurrence and local binary patterns), see
:data:`STAIN_TEXTURE_FEATURES`.

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

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0 model card
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

STAIN_TEXTURE = "stain-texture"
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
            reference="this module: stain_texture_features",
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
        from huggingface_hub import hf_hub_download  # allow_download=True only

        fetched = hf_hub_download(config.hub_id, config.hub_file)  # allow_download=True only
        return load_weights(config, fetched)
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
        patches = _check_patches(patches)
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


def _check_patches(patches: np.ndarray) -> np.ndarray:
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise InputError(
            f"patches must be (B, H, W, 3) uint8 RGB, got {patches.shape} {patches.dtype}"
        )
    return patches


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


# --- stain-texture ----------------------------------------------------------------------------

WORK_PX = 112  # features are computed at 112 x 112 px (a 224 px patch at 0.5 µm/px: 1 µm/px)
NUCLEUS_MIN_PX = 4  # smallest hematoxylin blob counted as a nucleus, in work px (~4 µm²)
H_FLOOR = 0.05  # lowest hematoxylin threshold (rgb2hed units): pure eosin yields no nuclei
H_MAX = 0.25  # hematoxylin is clipped to [0, H_MAX] for its co-occurrence matrix
LEVELS = 32  # grey levels of the co-occurrence matrices
GLCM_DISTANCES, GLCM_ANGLES = (1, 2), (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
_CHUNK = 256  # patches per vectorised step (~100 MB of work arrays)

STAIN_TEXTURE_FEATURES: tuple[str, ...] = (
    # colour (10): RGB in [0, 1]; saturation and value of HSV
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    "sat_mean", "sat_std", "val_mean", "val_std",
    # colour deconvolution (15): skimage rgb2hed; mean, std, 10th/50th/90th percentile
    *(f"{s}_{q}" for s in ("hem", "eos", "dab") for q in ("mean", "std", "q10", "q50", "q90")),
    # tissue (2): not white (grey < 0.85 or saturation > 0.1); dark (grey < 0.25)
    "tissue_frac", "dark_frac",
    # nuclei proxy (9): blobs (4-connected, >= NUCLEUS_MIN_PX) of hematoxylin > max(Otsu, H_FLOOR):
    # area fraction, log(1 + count), count per 1000 tissue px, mean and std of log blob area,
    # mean elongation (1 - minor/major axis), mean hematoxylin in blobs and in the other tissue,
    # mean eosin in blobs
    "nuc_area_frac", "nuc_log_count", "nuc_per_tissue", "nuc_log_size_mean", "nuc_log_size_std",
    "nuc_elong_mean", "nuc_hem_mean", "bg_hem_mean", "nuc_eos_mean",
    # co-occurrence (16): grey and clipped hematoxylin at 32 levels, symmetric and normalised,
    # offsets as skimage.feature.graycomatrix at distances 1 and 2, props averaged over 4 angles
    *(f"glcm_{img}_d{d}_{p}" for img in ("grey", "hem") for d in GLCM_DISTANCES for p in _GLCM_PROPS),
    # local binary patterns (10): uniform, P=8, R=1 on grey; fraction of pixels per code 0..9
    *(f"lbp_{i}" for i in range(10)),
    # edges (2): mean Sobel magnitude of grey; variance of its Laplacian (focus, fine texture)
    "sobel_mean", "laplace_var",
)  # fmt: skip


def stain_texture_features(patches: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 64) float32, see STAIN_TEXTURE_FEATURES; deterministic.

    Patches are first resized to 112 x 112 (a 2 x 2 mean for the 224 px patches of extract);
    every block is vectorised over the batch. Constant patches (white, black) give finite values.
    """
    patches = _check_patches(patches)
    out = np.zeros((len(patches), len(STAIN_TEXTURE_FEATURES)), np.float32)
    for i in range(0, len(patches), _CHUNK):
        out[i : i + _CHUNK] = _stain_texture_batch(_to_work_size(patches[i : i + _CHUNK]))
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _to_work_size(patches: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, 112, 112) float32 in [0, 1], channels first."""
    b, h, w, _ = patches.shape
    x = np.ascontiguousarray(patches.transpose(0, 3, 1, 2), dtype=np.float32)  # (B, 3, H, W)
    if h % WORK_PX or w % WORK_PX:
        from skimage.transform import resize

        return resize(x / 255, (b, 3, WORK_PX, WORK_PX), anti_aliasing=True).astype(np.float32)
    fh, fw = h // WORK_PX, w // WORK_PX
    work = sum(x[..., i::fh, j::fw] for i in range(fh) for j in range(fw))  # block sums
    return work / (255 * fh * fw)


def _stain_texture_batch(rgb: np.ndarray) -> np.ndarray:
    """(B, 3, 112, 112) float32 RGB in [0, 1] -> (B, 64) features."""
    from skimage.color import hed_from_rgb

    b = len(rgb)
    r, g, bl = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    grey = 0.299 * r + 0.587 * g + 0.114 * bl  # (B, h, w)
    vmax, vmin = np.maximum(np.maximum(r, g), bl), np.minimum(np.minimum(r, g), bl)
    sat = (vmax - vmin) / np.maximum(vmax, 1e-6)
    # colour deconvolution exactly as skimage.color.rgb2hed, channels first
    od = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)  # (B, 3, h, w)
    hed = np.maximum(np.einsum("bchw,cs->bshw", od, hed_from_rgb.astype(np.float32)), 0)
    tissue = (grey < 0.85) | (sat > 0.1)
    sub = hed[..., ::2, ::2].reshape(b, 3, -1)  # percentiles on every other pixel: 4x cheaper
    quantiles = np.percentile(sub, (10, 50, 90), axis=2).transpose(1, 2, 0)  # (B, 3, 3)
    stains = np.concatenate(
        [hed.mean((2, 3))[..., None], hed.std((2, 3))[..., None], quantiles], axis=2
    )  # (B, 3 stains, 5): mean, std, q10, q50, q90
    blocks = [
        rgb.mean((2, 3)), rgb.std((2, 3)),
        np.stack([sat.mean((1, 2)), sat.std((1, 2)), vmax.mean((1, 2)), vmax.std((1, 2))], 1),
        stains,
        np.stack([tissue.mean((1, 2)), (grey < 0.25).mean((1, 2))], 1),
        _nuclei_features(hed, tissue),
        glcm_props(grey),
        glcm_props(np.clip(hed[:, 0] / H_MAX, 0, 1)),
        lbp_histograms(np.round(grey * 255)),
        _edge_features(grey),
    ]  # fmt: skip
    return np.concatenate([np.asarray(x, np.float64).reshape(b, -1) for x in blocks], axis=1)


def _otsu(images: np.ndarray, bins: int = 256) -> np.ndarray:
    """Otsu threshold of each image (B, ...) -> (B,), from a 256-bin histogram over its range."""
    b = len(images)
    flat = images.reshape(b, -1)
    lo, hi = flat.min(1), flat.max(1)
    width = np.maximum(hi - lo, 1e-12) / bins
    idx = np.minimum(((flat - lo[:, None]) / width[:, None]).astype(np.int64), bins - 1)
    hist = np.bincount((idx + np.arange(b)[:, None] * bins).ravel(), minlength=b * bins)
    hist = hist.reshape(b, bins).astype(np.float64)  # (B, bins)
    centres = lo[:, None] + (np.arange(bins) + 0.5) * width[:, None]  # (B, bins)
    w1, w2 = hist.cumsum(1), hist[:, ::-1].cumsum(1)[:, ::-1]  # pixels at or below / above
    m1 = (hist * centres).cumsum(1) / np.maximum(w1, 1)
    m2 = (hist * centres)[:, ::-1].cumsum(1)[:, ::-1] / np.maximum(w2, 1)
    between = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2  # (B, bins - 1)
    return np.take_along_axis(centres, between.argmax(1)[:, None], 1)[:, 0]


def _per_image_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over ``mask`` per image (B, h, w) -> (B,); 0 where the mask is empty."""
    n = mask.sum((1, 2))
    return np.where(n > 0, (values * mask).sum((1, 2)) / np.maximum(n, 1), 0.0)


def _nuclei_features(hed: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Hematoxylin blobs as a proxy for nuclei -> (B, 9), see STAIN_TEXTURE_FEATURES."""
    from scipy import ndimage

    b = len(hed)
    hem = hed[:, 0]
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, never across images
    labels, n = ndimage.label(hem > np.maximum(_otsu(hem), H_FLOOR)[:, None, None], structure)
    img, yy, xx = np.nonzero(labels)  # blob pixels
    lab = labels[img, yy, xx]
    size = np.bincount(lab, minlength=n + 1).astype(np.float64)  # (n + 1,); [0] unused
    kept = size >= NUCLEUS_MIN_PX
    kept[0] = False
    blob_img = np.zeros(n + 1, np.int64)
    blob_img[lab] = img  # the image each blob lies in
    count = np.bincount(blob_img[kept], minlength=b).astype(np.float64)  # (B,)

    def per_image(v: np.ndarray) -> np.ndarray:  # mean over each image's kept blobs
        return np.bincount(blob_img[kept], v, b) / np.maximum(count, 1)

    log_size = np.log(size[kept])
    mean_log = per_image(log_size)
    nuc = kept[labels]  # (B, h, w)
    return np.stack(
        [
            nuc.mean((1, 2)),
            np.log1p(count),
            count / np.maximum(tissue.sum((1, 2)), 1) * 1000,
            mean_log,
            np.sqrt(np.maximum(per_image(log_size**2) - mean_log**2, 0)),
            per_image(_elongation(lab, yy, xx, size)[kept]),
            _per_image_mean(hem, nuc),
            _per_image_mean(hem, tissue & ~nuc),
            _per_image_mean(hed[:, 1], nuc),
        ],
        axis=1,
    )


def _elongation(lab: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: np.ndarray) -> np.ndarray:
    """1 - minor/major axis of every blob from its pixels' second moments (0: round) -> (n + 1,)."""
    n, area = len(size), np.maximum(size, 1)
    y, x = yy.astype(np.float64), xx.astype(np.float64)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, v, n) / area

    my, mx = mean(y), mean(x)
    syy = mean(y * y) - my**2 + 1 / 12  # + the variance of a unit pixel
    sxx = mean(x * x) - mx**2 + 1 / 12
    sxy = mean(x * y) - mx * my
    half_trace, disc = (sxx + syy) / 2, np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    return 1 - np.sqrt(np.maximum(half_trace - disc, 0) / (half_trace + disc))


def glcm_props(images: np.ndarray) -> np.ndarray:
    """Co-occurrence props of images (B, h, w) in [0, 1] -> (B, 2 distances x 4 props).

    Equal to ``graycoprops`` of ``graycomatrix(q, GLCM_DISTANCES, GLCM_ANGLES, levels=32,
    symmetric=True, normed=True)``, ``q`` the image at 32 levels, averaged over the angles.
    """
    b, h, w = images.shape
    q = np.minimum(images * LEVELS, LEVELS - 1).astype(np.intp)  # (B, h, w)
    first = q * LEVELS + (np.arange(b) * LEVELS**2)[:, None, None]  # row index in stacked GLCMs
    counts: dict[tuple[int, int], np.ndarray] = {}
    glcm = np.zeros((b, len(GLCM_DISTANCES), len(GLCM_ANGLES), LEVELS, LEVELS))
    for di, d in enumerate(GLCM_DISTANCES):
        for ai, angle in enumerate(GLCM_ANGLES):
            dr, dc = round(np.sin(angle) * d), round(np.cos(angle) * d)  # skimage's offsets
            if (dr, dc) not in counts:  # (1, ±1) twice: skimage rounds 2 x sin(45°) to 1
                a = first[:, : h - dr, max(0, -dc) : w - max(0, dc)]
                c = q[:, dr:, max(0, dc) : w + min(0, dc)]
                pairs = np.bincount((a + c).ravel(), minlength=b * LEVELS**2)
                counts[dr, dc] = pairs.reshape(b, LEVELS, LEVELS)
            glcm[:, di, ai] = counts[dr, dc]
    glcm = glcm + glcm.swapaxes(-1, -2)  # symmetric
    glcm = glcm.reshape(-1, LEVELS * LEVELS)  # (B * dist * angle, L²)
    glcm /= np.maximum(glcm.sum(1, keepdims=True), 1)
    i, j = (v.ravel().astype(np.float64) for v in np.indices((LEVELS, LEVELS)))
    # sums over each matrix as products with weight vectors: one matmul instead of many passes
    weights = np.stack([(i - j) ** 2, 1 / (1 + (i - j) ** 2), i, j, i * i, j * j, i * j], 1)
    contrast, homogeneity, mu_i, mu_j, ii, jj, ij = (glcm @ weights).T
    energy = np.sqrt(np.einsum("nk,nk->n", glcm, glcm))
    var_i, var_j = np.maximum(ii - mu_i**2, 0), np.maximum(jj - mu_j**2, 0)
    flat = (var_i < 1e-30) | (var_j < 1e-30)  # skimage: correlation 1 if either std < 1e-15
    cov = ij - mu_i * mu_j
    correlation = np.where(flat, 1.0, cov / np.sqrt(np.where(flat, 1.0, var_i * var_j)))
    props = np.stack([contrast, homogeneity, energy, correlation], -1)  # (B * dist * angle, 4)
    return props.reshape(b, len(GLCM_DISTANCES), len(GLCM_ANGLES), 4).mean(2).reshape(b, -1)


def _uniform_lut() -> np.ndarray:
    """8-bit neighbour pattern -> uniform LBP code 0..9 (transitions counted as skimage does:
    between consecutive neighbours, not wrapping around)."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
    transitions = (bits[:, 1:] != bits[:, :-1]).sum(1)
    return np.where(transitions <= 2, bits.sum(1), 9).astype(np.uint8)


_LBP_LUT = _uniform_lut()


def lbp_codes(grey: np.ndarray) -> np.ndarray:
    """Uniform LBP codes (P=8, R=1) of images (B, h, w) on a 0..255 scale -> (B, h, w) in 0..9.

    Neighbours on the unit circle as skimage.feature.local_binary_pattern samples them (bilinear
    for the diagonals, 0 outside the image); a neighbour within 1e-3 of the centre counts as not
    darker, so flat regions are code 8 whatever the rounding of the interpolation.
    """
    b, h, w = grey.shape
    grey = grey.astype(np.float32)
    pad = np.pad(grey, ((0, 0), (1, 1), (1, 1)))  # (B, h + 2, w + 2)

    def at(dr: int, dc: int) -> np.ndarray:  # grey shifted by (dr, dc), zeros outside
        return pad[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

    pattern = np.zeros((b, h, w), np.uint8)
    for p in range(8):
        rp, cp = round(-np.sin(2 * np.pi * p / 8), 5), round(np.cos(2 * np.pi * p / 8), 5)
        r0, c0 = math.floor(rp), math.floor(cp)
        fr, fc = np.float32(rp - r0), np.float32(cp - c0)
        value = at(r0, c0)
        if fr and fc:  # diagonal: bilinear from the 4 surrounding pixels
            top = (1 - fc) * value + fc * at(r0, c0 + 1)
            bottom = (1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)
            value = (1 - fr) * top + fr * bottom
        pattern |= (value >= grey - 1e-3).astype(np.uint8) << p
    return _LBP_LUT[pattern]


def lbp_histograms(grey: np.ndarray) -> np.ndarray:
    """Fraction of pixels per uniform LBP code: (B, h, w) on a 0..255 scale -> (B, 10)."""
    codes = lbp_codes(grey).astype(np.intp)
    b = len(codes)
    hist = np.bincount((codes + 10 * np.arange(b)[:, None, None]).ravel(), minlength=10 * b)
    return hist.reshape(b, 10) / codes[0].size


def _edge_features(grey: np.ndarray) -> np.ndarray:
    """Mean Sobel magnitude and Laplacian variance of each image (B, h, w) -> (B, 2)."""
    from scipy import ndimage

    sobel = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)[None]  # (1, 3, 3)
    laplace = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)[None]
    g_r = ndimage.correlate(grey, sobel, mode="reflect")  # kernel depth 1: images never mix
    g_c = ndimage.correlate(grey, sobel.transpose(0, 2, 1), mode="reflect")
    lap = ndimage.correlate(grey, laplace, mode="reflect")
    return np.stack([np.hypot(g_r, g_c).mean((1, 2)), lap.var((1, 2))], 1)
