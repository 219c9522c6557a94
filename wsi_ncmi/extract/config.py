"""Extraction settings: one dataclass is the single source of defaults.

``configs/extract.yaml`` mirrors these defaults (a test keeps them equal); ``--config FILE``
loads a YAML of any subset, and command-line flags override both.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.settings import merge_settings
from wsi_ncmi.slides.geojson import geojson_for, require_geojson_dir
from wsi_ncmi.slides.mpp import check_mpp_value
from wsi_ncmi.slides.tissue import TissueParams


@dataclass
class ExtractConfig:
    slides: list[str] = field(default_factory=list)
    out: str = "features"
    encoder: str = "resnet50_trunc"
    weights: str | None = None
    encoder_input: str = "model"      # model: resize patches to the encoder's input size; patch: as cut (CNNs)
    mpp: float = 0.5                  # target microns per pixel of the patches
    patch_size: int = 256             # patch side in px at the target mpp
    min_tissue: float = 0.25          # keep a patch when at least this fraction is tissue
    tissue_mpp: float = 8.0           # resolution of the tissue mask
    min_saturation: int = 15
    max_saturation: int = 45
    min_region_um2: float = 20000.0
    max_hole_um2: float = 20000.0
    tissue_geojson: str | None = None  # folder of <slide_id>.geojson tissue polygons used instead of detection
    remove_pen: bool = False          # subtract green/blue/black marker ink from the tissue mask
    slide_mpp: float | None = None    # level-0 mpp for slides whose metadata has none
    mpp_csv: str | None = None        # slide_id,mpp per-slide overrides
    device: str = "auto"              # auto, cpu, cuda, cuda:1, ...
    reader: str = "auto"              # auto (raw JPEG tiles where verified, else OpenSlide) or openslide
    batch_size: int = 0               # 0 = auto (256 on GPU, 32 on CPU)
    workers: int = -1                 # -1 = auto (cores - 1, at most 16)
    precision: str = "auto"           # auto (encoder's own on GPU, fp32 on CPU), fp32, fp16, bf16
    compile: str = "auto"             # auto (on on GPU, off on CPU), on, off: torch.compile the encoder
    feature_dtype: str = "float16"
    shard: str = "0/1"                # i/N: this process takes slides i, i+N, ...
    thumbnails: bool = True
    lock_stale_after: float = 3600.0  # seconds without a heartbeat before another node takes a slide
    progress: bool = True

    def tissue_params(self) -> TissueParams:
        return TissueParams(mask_mpp=self.tissue_mpp, min_saturation=self.min_saturation,
                            max_saturation=self.max_saturation, min_region_um2=self.min_region_um2,
                            max_hole_um2=self.max_hole_um2)

    def geojson_for(self, slide_id: str) -> Path | None:
        """This slide's tissue GeoJSON under ``--tissue-geojson``, or None (tissue detection)."""
        return geojson_for(self.tissue_geojson, slide_id)

    @property
    def shard_index(self) -> tuple[int, int]:
        try:
            i, n = (int(v) for v in str(self.shard).split("/"))
        except ValueError:
            raise WsiNcmiError(f"--shard {self.shard}: expected i/N, e.g. 0/4 for the first of 4 jobs") from None
        if not (n >= 1 and 0 <= i < n):
            raise WsiNcmiError(f"--shard {self.shard}: need 0 <= i < N")
        return i, n

    def validate(self) -> "ExtractConfig":
        check_mpp_value(self.mpp, "--mpp")
        if self.slide_mpp is not None:
            check_mpp_value(self.slide_mpp, "--slide-mpp")
        if not 16 <= self.patch_size <= 4096:
            raise WsiNcmiError(f"--patch-size {self.patch_size}: use 16-4096 px (typical: 224 or 256)")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise WsiNcmiError(f"--min-tissue {self.min_tissue}: a fraction between 0 and 1")
        if self.encoder_input not in ("model", "patch"):
            raise WsiNcmiError(f"--encoder-input {self.encoder_input}: choose model (resize patches to the encoder's "
                               "input size) or patch (feed them at --patch-size; CNN encoders only)")
        if self.reader not in ("auto", "openslide"):
            raise WsiNcmiError(f"--reader {self.reader}: choose auto (raw JPEG tiles when possible) or openslide")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise WsiNcmiError(f"--precision {self.precision}: choose auto, fp32, fp16 or bf16")
        if isinstance(self.compile, bool):   # YAML reads on/off as booleans
            self.compile = "on" if self.compile else "off"
        if self.compile not in ("auto", "on", "off"):
            raise WsiNcmiError(f"--compile {self.compile}: choose auto (on on a GPU, off on a CPU), on or off")
        if self.feature_dtype not in ("float16", "float32"):
            raise WsiNcmiError(f"--feature-dtype {self.feature_dtype}: choose float16 or float32")
        if self.batch_size < 0:
            raise WsiNcmiError("--batch-size must be positive (or 0 for auto)")
        require_geojson_dir(self.tissue_geojson)
        self.shard_index  # noqa: B018  (validates)
        return self

    def resolved_workers(self, processes_per_node: int = 1) -> int:
        """Reader processes for this process: auto shares the node's cores among its ranks."""
        if self.workers >= 0:
            return self.workers
        return max(0, min(16, (os.cpu_count() or 1) // max(1, processes_per_node) - 1))

    def compile_on(self, device_type: str) -> bool:
        """Whether to ``torch.compile`` the encoder: auto compiles on a GPU only (see ``--compile``)."""
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, **overrides) -> "ExtractConfig":
        """Defaults < YAML file < explicit overrides (``None`` means "not given")."""
        return merge_settings(cls, "extract", yaml_path, overrides)
