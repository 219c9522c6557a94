"""``Encoder``: uint8 patches in, embeddings out, with the model's own preprocessing on the device.

Workers send raw uint8 patches (4x smaller than float over the pinned-memory link); scaling,
resizing and normalisation run on the GPU in float32, the trunk under autocast in the
encoder's precision.

``Encoder.use_compile()`` (``extract --compile``) runs the embedding through ``torch.compile``
(TorchInductor; Ansel et al. 2024, PyTorch 2, ASPLOS '24) and keeps convolutional trunks in
channels-last memory format. It is a runtime option: the features equal eager ones within float
tolerance, so it is recorded (attribute ``compile``) but is no part of a file's settings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
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
        self.compile_state = "off"     # off | inductor[+channels_last] | eager[+channels_last] (why)
        self._compiled = None
        self._compiled_batch = 0
        self._channels_last = False
        self.patch_input = False       # True: patches go in at their own size (``use_patch_input``)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None = None, device="cpu", allow_random: bool = False):
        import timm

        if spec.builder == "module":   # a module of this package (CONCH v1.5: ViT-L + attentional pooler)
            if weights is not None:
                if not Path(weights).is_file():
                    raise WsiNcmiError(f"{weights}: weights file not found; pass the path to a downloaded "
                                       f"state dict for '{spec.name}'")
                trunk = spec.factory(spec)
                cls._load(trunk, _read_state_dict(weights), spec, weights)
                weights_id = f"file:{Path(weights).name} sha256:{file_digest(weights)}"
            elif allow_random:
                trunk, weights_id = spec.factory(spec), "random-init"
            else:
                path = cls._hub_file(spec)     # before building: offline, the error comes at once
                trunk = spec.factory(spec)
                cls._load(trunk, _read_state_dict(path), spec, path)
                weights_id = f"{spec.hub}/{spec.hub_file}"
            return cls._finish(spec, trunk, weights_id, device)
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
            raise _hub_error(spec, spec.hub or spec.arch, exc) from None

    @staticmethod
    def _hub_file(spec: EncoderSpec) -> str:
        """Download ``spec.hub_file`` of the hub repo (cached by huggingface_hub)."""
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(spec.hub.removeprefix("hf-hub:"), spec.hub_file)
        except Exception as exc:
            raise _hub_error(spec, spec.hub, exc, f"{spec.hub_file}; ") from None

    @staticmethod
    def _load(trunk: nn.Module, sd: dict, spec: EncoderSpec, path: str) -> None:
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        if hasattr(trunk, "adapt_state_dict"):   # e.g. CONCH v1.5: position embeddings to its input size
            sd = trunk.adapt_state_dict(sd)
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
        if self.patch_input:
            pass
        elif s.resize == "resize-crop":
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
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = _DTYPES[precision]
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.embed(x) if self._compiled is None else self._embed_compiled(x)
        return out.float()

    # ---- torch.compile ------------------------------------------------------------------
    def is_convnet(self) -> bool:
        """More than one 2-D convolution: a CNN (a ViT has one, its patch embedding)."""
        return sum(isinstance(m, nn.Conv2d) for m in self.trunk.modules()) > 1

    def use_patch_input(self) -> None:
        """Feed patches at their own size instead of resizing them to the card's input size
        (``--encoder-input patch``).

        Why: a CNN ends in global pooling, so it embeds any size, and its cost grows with the pixels
        it sees. A 112 px patch upsampled to 224 px costs four times as much and carries no more
        detail. Position embeddings fix the grid of a ViT or a hybrid, so those are refused.
        """
        if not self.is_convnet() or any(hasattr(m, "pos_embed") for m in self.trunk.modules()):
            raise WsiNcmiError(f"--encoder-input patch: encoder '{self.spec.name}' is not a plain CNN (position "
                               "embeddings fix a ViT's or a hybrid's input size); use --encoder-input model")
        self.patch_input = True

    def use_compile(self, mode: str | None = None) -> str:
        """Compile ``embed`` with ``torch.compile`` (and put a CNN in channels-last); returns the state.

        One graph of a fixed batch size is compiled (the first batch's); smaller batches (a slide's
        last) are padded to it, so a cohort never recompiles. Where compiling cannot work (no C++
        compiler for CPU code, no Triton for GPU code) or fails on the first batch, one line says
        so on stderr and the encoder runs eager.
        """
        if self._compiled is not None or self.compile_state != "off":
            return self.compile_state
        if self.is_convnet():
            self.trunk.to(memory_format=torch.channels_last)
            self._channels_last = True
        suffix = "+channels_last" if self._channels_last else ""
        missing = _compile_blocker(self.mean.device)
        if missing:
            return self._compile_off(missing, suffix)
        kw = {"mode": mode} if mode else {}
        self._compiled = torch.compile(self.embed, dynamic=False, **kw)
        self.compile_state = "inductor" + suffix
        return self.compile_state

    def _compile_off(self, why: str, suffix: str) -> str:
        print(f"wsi-ncmi: warning: --compile: {why}; running the encoder eager", file=sys.stderr, flush=True)
        self._compiled = None
        self.compile_state = f"eager{suffix} ({why})"
        return self.compile_state

    def _embed_compiled(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        self._compiled_batch = max(self._compiled_batch, n)
        if n < self._compiled_batch:   # pad to the compiled batch: one graph for every batch
            pad = x.new_zeros((self._compiled_batch - n, *x.shape[1:]))
            x = torch.cat([x, pad])
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        try:
            return self._compiled(x)[:n]
        except Exception as exc:  # a backend that cannot build this graph: the same model, eager
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            self._compile_off(f"torch.compile failed ({type(exc).__name__}: {first})",
                              "+channels_last" if self._channels_last else "")
            return self.embed(x[:n])


def _compile_blocker(device: torch.device) -> str | None:
    """Why TorchInductor cannot generate code for ``device`` here, or None."""
    if device.type == "cpu":
        cands = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in cands):
            return "no C++ compiler found (TorchInductor needs g++ or clang++ for CPU code)"
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed (TorchInductor needs it for GPU code)"
    return None

def _hub_error(spec: EncoderSpec, source: str, exc: Exception, what: str = "") -> WsiNcmiError:
    """One line for weights the hub would not give: the cause's first sentence, and the fix
    (licence + login for gated repos, else a local ``--weights FILE``)."""
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:140]
    access = ("the weights are gated: accept the licence on huggingface.co and run "
              "`huggingface-cli login`, or " if spec.gated else "")
    return WsiNcmiError(f"encoder '{spec.name}': cannot load pretrained weights from {source} "
                        f"({what}{type(exc).__name__}: {first}); {access}download the weights file and pass "
                        "--weights FILE")


def create_encoder(name: str, weights: str | None = None, device="cpu", allow_random: bool = False) -> Encoder:
    """Build the encoder ``name`` (registered, or any timm model) in eval mode on ``device``."""
    return Encoder.build(get_spec(name), weights=weights, device=device, allow_random=allow_random)
