"""Patch encoders: a registry of names -> timm models with their weights, preprocessing,
embedding size and recommended precision (the timm ``create_model`` pattern)."""

from wsi_ncmi.encoders import builtin as _builtin  # noqa: F401  (registers the built-in encoders)
from wsi_ncmi.encoders.model import Encoder, create_encoder
from wsi_ncmi.encoders.registry import EncoderSpec, get_spec, list_encoders, register_encoder

__all__ = ["Encoder", "EncoderSpec", "create_encoder", "get_spec", "list_encoders", "register_encoder"]
