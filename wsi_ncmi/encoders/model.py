"""``Encoder``: uint8 patches in, embeddings out, with the model's own preprocessing on the device.

Workers send raw uint8 patches (4x smaller than float over the pinned-memory link); scaling,
resizing and normalisation run on the GPU in float32, the trunk under autocast in the
encoder's precision.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ncmi.encoders.registry import EncoderSpec, get_spec
from wsi_ncmi.errors import WsiNcmiError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _read_state_dict(path: str) -> dict:
    from timm.models import load_state_dict

    try:
        return load_state_dict(path, use_ema=False)
    except Exception as exc:
        raise WsiNcmiError(f"{path}: cannot read weights ({type(exc).__name__}: {exc}); "
                           "pass a .pth/.bin/.safetensors state dict") from None


class Encoder(nn.Module):
    def __init__(self, spec: EncoderSpec, trunk: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights_id = weights_id
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.dim = spec.dim

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None = None, device="cpu", allow_random: bool = False):
        import timm

        if spec.builder == "transformers":
            from wsi_ncmi.encoders.hf import build_hf_trunk

            if weights is not None:
                if not Path(weights).is_file():
                    raise WsiNcmiError(f"{weights}: weights file not found; pass the path to a downloaded "
                                       f"state dict for '{spec.name}'")
                trunk = build_hf_trunk(spec, "random")
                cls._load(trunk.model, _read_state_dict(weights), spec, weights)
                weights_id = f"file:{Path(weights).name} sha256:{file_digest(weights)}"
            elif allow_random:
                trunk, weights_id = build_hf_trunk(spec, "random"), "random-init"
            else:
                trunk, weights_id = build_hf_trunk(spec, "hub"), spec.hub
            return cls._finish(spec, trunk, weights_id, device)
        if weights is not None:
            if not Path(weights).is_file():
                raise WsiNcmiError(f"{weights}: weights file not found; pass the path to a downloaded "
                                   f"state dict for '{spec.name}'")
            trunk = timm.create_model(spec.arch, pretrained=False, **cls._local_kwargs(spec))
            cls._load(trunk, _read_state_dict(weights), spec, weights)
            weights_id = f"file:{Path(weights).name} sha256:{file_digest(weights)}"
        elif allow_random:  # architecture only (tests, shape checks on the meta device)
            trunk = timm.create_model(spec.arch, pretrained=False, **cls._local_kwargs(spec))
            weights_id = "random-init"
        elif spec.local_weights is not None:
            path = spec.local_weights()
            trunk = timm.create_model(spec.arch, pretrained=False, **cls._local_kwargs(spec))
            cls._load(trunk, torch.load(path, map_location="cpu", weights_only=True), spec, path)
            weights_id = f"file:{Path(path).name} sha256:{file_digest(path)}"
        else:
            trunk = cls._from_hub(spec)
            weights_id = spec.hub or spec.arch
        if spec.pooling == "trunc-layer3":
            trunk.layer4 = nn.Identity()
            trunk.fc = nn.Identity()
        return cls._finish(spec, trunk, weights_id, device)

    @classmethod
    def _finish(cls, spec: EncoderSpec, trunk: nn.Module, weights_id: str, device) -> "Encoder":
        enc = cls(spec, trunk, weights_id).eval().to(device)
        if enc.dim < 0:  # an unregistered timm model: read its size
            enc.dim = int(getattr(trunk, "num_features"))
        for p in enc.parameters():
            p.requires_grad_(False)
        return enc

    @staticmethod
    def _local_kwargs(spec: EncoderSpec) -> dict:
        kw = dict(spec.arch_kwargs)
        kw.setdefault("num_classes", 0)
        return kw

    @staticmethod
    def _from_hub(spec: EncoderSpec) -> nn.Module:
        import timm

        kw = dict(spec.hub_kwargs) or {"num_classes": 0}
        kw.setdefault("num_classes", 0)
        try:
            return timm.create_model(spec.hub or spec.arch, pretrained=True, **kw)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:140]
            access = ("the weights are gated: accept the licence on huggingface.co and run "
                      "`huggingface-cli login`, or " if spec.gated else "")
            raise WsiNcmiError(
                f"encoder '{spec.name}': cannot load pretrained weights from {spec.hub or spec.arch} "
                f"({type(exc).__name__}: {first}); {access}download the weights file and pass "
                "--weights FILE") from None

    @staticmethod
    def _load(trunk: nn.Module, sd: dict, spec: EncoderSpec, path: str) -> None:
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        target = trunk.state_dict()
        if spec.weight_mapping == "ordered":
            src = [(k, v) for k, v in sd.items() if "num_batches_tracked" not in k]
            dst = [k for k in target if "num_batches_tracked" not in k]
            src = src[:len(dst)]
            if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
                raise WsiNcmiError(f"{path}: tensors do not map in order onto timm '{spec.arch}'; "
                                   "pass weights saved from that architecture")
            sd = {k: v for (_, v), k in zip(src, dst)}
        wrong = [k for k, v in sd.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
        if wrong:
            raise WsiNcmiError(f"{path}: {len(wrong)} tensors have the wrong shape for '{spec.arch}' (first: {wrong[0]} "
                               f"{tuple(sd[wrong[0]].shape)} vs {tuple(target[wrong[0]].shape)}); "
                               f"pass the weights of encoder '{spec.name}'")
        missing, unexpected = trunk.load_state_dict(sd, strict=False)
        # layer4/fc of a truncated ResNet and classifier heads may be absent from the file
        missing = [k for k in missing if not k.startswith(("fc.", "head.", "classifier."))]
        if missing:
            raise WsiNcmiError(f"{path}: {len(missing)} weights of '{spec.arch}' are missing from the file "
                               f"(first: {missing[0]}); pass the weights of encoder '{spec.name}'")

    # ---- inference ----------------------------------------------------------------------
    def preprocess(self, x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        x = x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
        s = self.spec
        if s.resize == "resize-crop":
            if x.shape[-1] != s.resize_to or x.shape[-2] != s.resize_to:
                x = F.interpolate(x, size=(s.resize_to, s.resize_to), mode="bilinear", antialias=True, align_corners=False)
            off = (s.resize_to - s.input_size) // 2
            x = x[..., off:off + s.input_size, off:off + s.input_size]
        elif x.shape[-1] != s.input_size or x.shape[-2] != s.input_size:
            x = F.interpolate(x, size=(s.input_size, s.input_size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of preprocessed float images."""
        p = self.spec.pooling
        t = self.trunk
        if p == "trunc-layer3":
            x = t.maxpool(t.act1(t.bn1(t.conv1(x))))
            x = t.layer3(t.layer2(t.layer1(x)))
            return x.mean(dim=(2, 3))
        if p == "cls":
            return t.forward_features(x)[:, 0]
        if p == "cls+mean":
            tokens = t.forward_features(x)
            npt = getattr(t, "num_prefix_tokens", 1)
            return torch.cat([tokens[:, 0], tokens[:, npt:].mean(1)], dim=-1)
        return t(x)

    @torch.inference_mode()
    def forward(self, x_uint8_nhwc: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        x = self.preprocess(x_uint8_nhwc)
        dtype = _DTYPES[precision]
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.embed(x)
        return out.float()


def create_encoder(name: str, weights: str | None = None, device="cpu", allow_random: bool = False) -> Encoder:
    """Build the encoder ``name`` (registered, or any timm model) in eval mode on ``device``."""
    return Encoder.build(get_spec(name), weights=weights, device=device, allow_random=allow_random)
