"""Choosing the torch device and precision from the user's ``--device`` / ``--precision``.

One low module (it imports only torch and the error type) so that extraction, training and the
benchmarks resolve ``auto``/``cuda``/``cpu`` the same way without importing each other.
"""

from __future__ import annotations

import torch

from wsi_ncmi.errors import WsiNcmiError


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU when one is visible, else the CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise WsiNcmiError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsiNcmiError(f"--device {name}: no CUDA GPU is visible; use --device cpu "
                           "(or run the container with --gpus all)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise WsiNcmiError(f"--device {name}: this machine has {torch.cuda.device_count()} visible GPU(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them")
    return dev


def resolve_precision(requested: str, recommended: str, device: torch.device) -> str:
    """``auto`` takes ``recommended`` on a GPU and fp32 on the CPU; bf16 falls back to fp16 on
    GPUs without bf16 support (pre-Ampere), where it would be emulated slowly or fail."""
    if requested != "auto":
        p = requested
    else:
        p = recommended if device.type == "cuda" else "fp32"
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        p = "fp16"
    return p
