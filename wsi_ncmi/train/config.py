"""Training settings: one dataclass is the single source of defaults (``configs/train/*.yaml``
override a subset, flags override both); the resolved config is saved in every run folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.settings import merge_settings


def parse_lr(value) -> float | str:
    """A learning rate: a positive number, or ``auto`` (chosen per loss on validation)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise WsiNcmiError(f"--lr {value}: give a number such as 1e-3, or auto") from None
    if not lr > 0 or lr != lr or lr == float("inf"):
        raise WsiNcmiError(f"--lr {value}: must be a positive number (or auto)")
    return lr


NCMI_PREDICT_RULES = ("auto", "nearest", "bayes")   # --ncmi-predict
NCMI_PREDICT_BEFORE = "nearest"   # the rule of every NCMI model trained before --ncmi-predict existed
NCMI_BEFORE = {"ncmi_separation": "mean", "ncmi_centre": "ema"}   # what every NCMI run trained before these settings
NCMI_TEMPERATURE_BEFORE = 0.3     # what a saved ``ncmi_temperature: null`` meant before the default became 0.03


def recorded_default(key: str, recorded: dict):
    """What a run folder's saved settings meant by leaving ``key`` out: the behaviour of the wsi-ncmi
    that wrote them. Settings added later default to what older versions did; for most that is the
    new default, but an NCMI run from before ``--ncmi-predict`` predicted by the nearest class mean."""
    if key == "ncmi_predict" and recorded.get("loss") == "ncmi":
        return NCMI_PREDICT_BEFORE
    if key == "ncmi_temperature" and "ncmi" in str(recorded.get("loss")):   # a loss without NCMI never read it
        return NCMI_TEMPERATURE_BEFORE
    if key == "feature_norm":       # runs from before --feature-norm used the features as extracted
        return "none"
    if key in NCMI_BEFORE:          # runs from before these NCMI settings trained the method as defined
        return NCMI_BEFORE[key]
    f = TrainConfig.__dataclass_fields__.get(key)
    return f.default if f is not None else None


@dataclass
class TrainConfig:
    task: str = "csv"                 # camelyon17, bracs, bracs3, csv
    labels: str | None = None         # label file (stage_labels.csv, bracs csv, cohort csv)
    slides: str | None = None         # BRACS_WSI folder (labels from the official layout)
    features: str = "features"
    out: str = "runs/run"
    model: str = "abmil"
    loss: str = "ncmi"
    seeds: int = 1                    # number of seeds, starting at ``seed``
    seed: int = 0
    epochs: int = 40
    lr: float | str = 1e-3            # or "auto": a grid per loss, chosen on validation (train/lr_search.py)
    weight_decay: float = 1e-4
    centroid_lr: float = 1e-2         # NCMI centroid step (Adam)
    batch_size: int = 1               # bags per step (padded with masks when > 1)
    max_patches: int = 0              # random sub-sample of each training bag (0 = all)
    patch_dropout: float = 0.0        # drop this share of each training bag's patches, afresh every epoch
    patience: int = 10                # early stopping on the validation criterion...
    min_epochs: int = 10              # ...which cannot fire before this many epochs
    select_metric: str = "loss"       # loss (validation NLL), auc, macro_f1, balanced_accuracy, accuracy
    clip: float = 1.0
    dropout: float = 0.25
    feature_norm: str = "zscore"      # zscore: standardise instance features with training-split stats; none
    device: str = "auto"
    precision: str = "auto"           # auto = bf16 on GPU, fp32 on CPU
    deterministic: bool = False
    resume: bool = False
    overwrite: bool = False           # replace a run of other settings in --out (train/runfolder.py)
    allow_missing: bool = False       # train without listed slides that have no features
    allow_patient_overlap: bool = False   # proceed when the label file puts one patient in two splits
    val_fraction: float = 0.1
    split_seed: int = 0
    test_fold: int = 0
    folds: int = 0                    # 0: the task's single split; K >= 2: K-fold cross-validation (tasks/folds.py)
    ncmi_space: str = "embedding"     # embedding (the method's) or logit
    ncmi_centroids: str = "alternating"
    ncmi_separation: str = "harmonic" # how NCMI's rival divergences combine: harmonic (measured), mean (the method's), min
    ncmi_centre: str = "none"         # embedding space: none (measured) or subtract the running centre (ema, the method's)
    ncmi_means: str = "running"       # NCMI class means per epoch: running (the train pass) or exact (eval pass)
    ncmi_temperature: float | str = "auto"   # NSF temperature, or auto: losses.ncmi.default_temperature for the
                                              # space and feature_norm; null in an older run's config = 0.3
    ncmi_predict: str = "auto"        # NCMI prediction: nearest (class mean), bayes (score), auto (on validation)
    ncmi_weight: float = 1.0          # for ce+ncmi
    mi_weight: float = 1.0            # mi: weight of the label-entropy term
    mi_window: int = 64               # mi: running window of samples for the marginal
    cmi_lambda: float = 0.5           # cmi_ce: concentration weight
    cmi_beta: float = 0.1             # cmi_ce: separation weight
    focal_gamma: float = 2.0
    label_smoothing: float = 0.1
    ram_gb: float = 16.0              # bags kept in RAM up to this size
    bootstrap: int = 1000
    progress: bool = True

    def validate(self) -> "TrainConfig":
        from wsi_ncmi.losses import LOSSES
        from wsi_ncmi.losses.ncmi import CENTRES, SEPARATIONS
        from wsi_ncmi.mil.models import MODELS

        if self.loss not in LOSSES:
            raise WsiNcmiError(f"--loss {self.loss}: choose one of {', '.join(LOSSES)}")
        if self.model not in MODELS:
            raise WsiNcmiError(f"--model {self.model}: choose one of {', '.join(MODELS)}")
        if self.ncmi_space not in ("logit", "embedding"):
            raise WsiNcmiError(f"--ncmi-space {self.ncmi_space}: choose logit or embedding")
        if self.ncmi_means not in ("exact", "running"):
            raise WsiNcmiError(f"--ncmi-means {self.ncmi_means}: choose exact or running")
        if self.ncmi_predict not in NCMI_PREDICT_RULES:
            raise WsiNcmiError(f"--ncmi-predict {self.ncmi_predict}: choose auto, nearest or bayes")
        if self.ncmi_separation not in SEPARATIONS:
            raise WsiNcmiError(f"--ncmi-separation {self.ncmi_separation}: choose {', '.join(SEPARATIONS)}")
        if self.ncmi_centre not in CENTRES:
            raise WsiNcmiError(f"--ncmi-centre {self.ncmi_centre}: choose {', '.join(CENTRES)}")
        if self.ncmi_centroids not in ("alternating", "fixed"):
            raise WsiNcmiError(f"--ncmi-centroids {self.ncmi_centroids}: choose alternating or fixed")
        if self.select_metric not in ("loss", "macro_f1", "auc", "balanced_accuracy", "accuracy"):
            raise WsiNcmiError(f"--select-metric {self.select_metric}: choose loss, macro_f1, auc, balanced_accuracy, "
                               "accuracy")
        self.lr = parse_lr(self.lr)
        for name in ("epochs", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise WsiNcmiError(f"--{name.replace('_', '-')} must be at least 1")
        if self.folds != 0 and self.folds < 2:
            raise WsiNcmiError(f"--folds {self.folds}: cross-validation needs at least 2 folds; pass --folds 5 (or "
                               "leave --folds out for the single split)")
        if self.min_epochs < 0 or self.patience < 0:
            raise WsiNcmiError("--min-epochs and --patience must be >= 0")
        for name in ("mi_weight", "mi_window", "cmi_lambda", "cmi_beta", "ncmi_weight"):
            if getattr(self, name) < 0:
                raise WsiNcmiError(f"--{name.replace('_', '-')} must be >= 0, not {getattr(self, name)}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise WsiNcmiError(f"--patch-dropout {self.patch_dropout}: the share of patches dropped must be in "
                               "[0, 1), e.g. 0.5")
        if self.ncmi_temperature is None:    # written by a wsi-ncmi whose default was 0.3: read as it meant
            self.ncmi_temperature = recorded_default("ncmi_temperature", {"loss": self.loss})
        if str(self.ncmi_temperature).strip().lower() == "auto":   # resolved here, so config.yaml holds the number
            from wsi_ncmi.losses.ncmi import default_temperature

            self.ncmi_temperature = default_temperature(self.ncmi_space, self.feature_norm == "zscore")
        try:
            self.ncmi_temperature = float(self.ncmi_temperature)
        except (TypeError, ValueError):
            raise WsiNcmiError(f"--ncmi-temperature {self.ncmi_temperature}: give a number such as 0.03, or "
                               "auto") from None
        if not self.ncmi_temperature > 0:
            raise WsiNcmiError(f"--ncmi-temperature {self.ncmi_temperature}: must be > 0, e.g. 0.03")
        if self.feature_norm not in ("none", "zscore"):
            raise WsiNcmiError(f"--feature-norm {self.feature_norm}: choose none or zscore")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise WsiNcmiError(f"--precision {self.precision}: choose auto, fp32, bf16, fp16")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump({"train": self.to_dict()}, sort_keys=False))

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, **overrides) -> "TrainConfig":
        """Defaults < YAML file < explicit overrides (``None`` means "not given")."""
        return merge_settings(cls, "train", yaml_path, overrides)


def saved_config(path: str | Path, **overrides) -> TrainConfig:
    """A run folder's ``config.yaml`` as the wsi-ncmi that wrote it meant it: a setting it lacks (added
    to TrainConfig later) takes ``recorded_default``, not today's default (an old run's missing
    ``feature_norm`` is ``none``). ``overrides`` win, as in ``from_sources``."""
    saved = (yaml.safe_load(Path(path).read_text()) or {}).get("train") or {}
    older = {f.name: recorded_default(f.name, saved) for f in fields(TrainConfig) if f.name not in saved}
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig.from_sources(str(path), **{**older, **given})   # one validate, on the filled-in values
