"""Aggregator registry: ``create_mil_model(name, in_dim, num_classes, **kwargs)``."""

from __future__ import annotations

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.mil.models.abmil import ABMIL
from wsi_ncmi.mil.models.acmil import ACMIL
from wsi_ncmi.mil.models.base import MILModel, MILOutput
from wsi_ncmi.mil.models.clam import CLAM_MB, CLAM_SB
from wsi_ncmi.mil.models.dsmil import DSMIL
from wsi_ncmi.mil.models.pooling import MaxPoolMIL, MeanPoolMIL
from wsi_ncmi.mil.models.transmil import TransMIL

MODELS = {
    "abmil": ABMIL, "clam_sb": CLAM_SB, "clam_mb": CLAM_MB, "transmil": TransMIL, "dsmil": DSMIL,
    "acmil": ACMIL, "meanpool": MeanPoolMIL, "maxpool": MaxPoolMIL,
}


def create_mil_model(name: str, in_dim: int, num_classes: int, **kwargs) -> MILModel:
    if name not in MODELS:
        raise WsiNcmiError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name](in_dim, num_classes, **kwargs)


__all__ = ["MODELS", "MILModel", "MILOutput", "create_mil_model"]
