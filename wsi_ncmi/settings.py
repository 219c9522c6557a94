"""Settings from three sources, one rule: dataclass defaults < YAML file < command-line flags.

Shared by ``ExtractConfig`` and ``TrainConfig``; a YAML file may hold the settings at top level or
under the command's section (``extract:`` / ``train:``), and unknown keys are an error naming them.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from wsi_ncmi.errors import WsiNcmiError


def merge_settings(cls, section: str, yaml_path: str | None, overrides: dict):
    """An instance of dataclass ``cls``; ``None`` in ``overrides`` means "flag not given"."""
    names = {f.name for f in fields(cls)}
    values: dict = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise WsiNcmiError(f"{p}: config file not found")
        data = yaml.safe_load(p.read_text()) or {}
        data = data.get(section, data)
        unknown = sorted(set(data) - names)
        if unknown:
            raise WsiNcmiError(f"{p}: unknown {section} settings {', '.join(unknown)}; "
                               f"valid: {', '.join(sorted(names))}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    return cls(**values).validate()
