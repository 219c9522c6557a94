"""Encoder registry: ``EncoderSpec`` says everything extraction needs to know about a model.

Any timm model name that is not registered can be used as well (``--encoder vit_small_patch16_224
--weights FILE``): its size, mean/std and input size are read from timm's pretrained config.

This module only describes encoders; building one is ``encoders/model.py``'s job
(``create_encoder``). The dependency runs one way (model -> registry): a spec can be looked up
or registered without touching the model code, and no import cycle hides behind a lazy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from wsi_ncmi.errors import WsiNcmiError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """How to build, feed and run one patch encoder.

    ``pooling``: ``"head"`` (the timm model's own pooled output), ``"cls"`` (the final class token),
    ``"cls+mean"`` (class token concatenated with the mean of the patch tokens after
    ``num_prefix_tokens``; Virchow, Virchow2, Midnight), or
    ``"trunc-layer3"`` (ResNet-50 stem..layer3 + global average pool; CLAM/TRIDENT baseline).
    ``resize``: ``"resize"`` to ``input_size`` or ``"resize-crop"`` (resize to ``resize_to`` then
    centre-crop ``input_size``; Prov-GigaPath's published transform).
    ``builder``: ``"timm"`` or ``"transformers"`` (``hf_config``: the ``transformers`` config class
    and its arguments, used to build the architecture offline; see ``encoders/hf.py``), or
    ``"module"`` (``factory(spec)`` builds the architecture, ``hub_file`` is its weights file in the
    ``hub`` repo; CONCH v1.5, see ``encoders/conch.py``).
    """

    name: str
    arch: str                       # timm architecture for local construction
    dim: int
    arch_kwargs: dict = field(default_factory=dict)
    hub: str | None = None          # "hf-hub:org/repo" or a timm "arch.tag" with hub weights
    hub_kwargs: dict = field(default_factory=dict)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    input_size: int = 224
    resize: str = "resize"
    resize_to: int = 224
    pooling: str = "head"
    precision: str = "bf16"         # recommended on GPU
    gated: bool = False
    citation: str = ""
    local_weights: Callable[[], str] | None = None  # weights shipped in a Python package
    weight_mapping: str = "names"   # "names" or "ordered" (tensors mapped in order)
    builder: str = "timm"           # "timm" or "transformers"
    hf_config: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    factory: Callable[["EncoderSpec"], Any] | None = None   # builder "module": builds the architecture
    hub_file: str | None = None     # builder "module": the weights file in the hub repo

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "dim": self.dim, "hub": self.hub,
                "input_size": self.input_size, "resize": self.resize, "mean": list(self.mean),
                "std": list(self.std), "pooling": self.pooling, "precision": self.precision,
                "builder": self.builder}


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"encoder '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """The registered spec, or one derived from timm's config for any other timm model name."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    import timm

    if not timm.is_model(name):
        raise WsiNcmiError(f"unknown encoder '{name}'; choose one of {', '.join(list_encoders())} "
                           "or any timm model name (see `timm.list_models()`) with --weights FILE")
    cfg = timm.get_pretrained_cfg(name) or None
    mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN)) if cfg else IMAGENET_MEAN
    std = tuple(getattr(cfg, "std", IMAGENET_STD)) if cfg else IMAGENET_STD
    size = int(getattr(cfg, "input_size", (3, 224, 224))[-1]) if cfg else 224
    return EncoderSpec(name=name, arch=name, dim=-1, hub=name, mean=mean, std=std, input_size=size,
                       resize_to=size, precision="bf16")
