"""Encoders whose model card builds them with Hugging Face ``transformers`` (DINOv2 family).

Phikon-v2, Hibou-L and Midnight-12k publish ``transformers`` checkpoints (``AutoModel``), not timm
ones; ``HFTrunk`` wraps such a model so that ``Encoder`` treats it like a timm ViT:
``forward_features`` returns the final (layer-normed) tokens and ``num_prefix_tokens`` counts the
class token plus any registers, so the ``cls`` and ``cls+mean`` poolings apply unchanged.

Offline (tests, ``--random-weights``) the architecture is built from the config in the spec;
with ``--weights FILE`` the same architecture is built and the state dict loaded into it; otherwise
``AutoModel.from_pretrained`` downloads the card's checkpoint (gated repos need a login).
"""

from __future__ import annotations

import torch.nn as nn

from wsi_ncmi.errors import WsiNcmiError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise WsiNcmiError("this encoder is built with Hugging Face transformers; run "
                           "`pip install transformers`") from None
    return transformers


class HFTrunk(nn.Module):
    def __init__(self, model: nn.Module, num_prefix_tokens: int):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens

    def forward_features(self, x):
        return self.model(pixel_values=x).last_hidden_state

    def forward(self, x):
        return self.forward_features(x)[:, 0]


def build_config(spec):
    tf = _transformers()
    kw = dict(spec.hf_config)
    cls = getattr(tf, kw.pop("config_class"))
    return cls(**kw)


def build_hf_trunk(spec, mode: str) -> HFTrunk:
    """``mode``: "random" (architecture from the spec's config) or "hub" (``from_pretrained``)."""
    tf = _transformers()
    cfg = build_config(spec)
    prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    if mode == "random":
        return HFTrunk(tf.AutoModel.from_config(cfg), prefix)
    repo = spec.hub.removeprefix("hf-hub:")
    try:
        model = tf.AutoModel.from_pretrained(repo, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:140]
        access = ("the weights are gated: accept the licence on huggingface.co and run "
                  "`huggingface-cli login`, or " if spec.gated else "")
        raise WsiNcmiError(f"encoder '{spec.name}': cannot load pretrained weights from {spec.hub} "
                           f"({type(exc).__name__}: {first}); {access}download the weights file and pass "
                           "--weights FILE") from None
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return HFTrunk(model, prefix)
