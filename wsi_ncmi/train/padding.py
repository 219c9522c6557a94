"""A warning when ``--batch-size`` > 1 makes padding multiply memory.

Why: a step pads every bag to the longest bag in it, so one 200,000-patch slide among 5,000-patch
ones makes each of its steps hold ``batch_size`` x 200,000 rows (14.9 GB at batch size 4, seen in
practice) with no hint of why. Bucketing bags by size would change the training order (and so the
results of every existing run); the warning names the bag, the cost and the two fixes instead.
"""

from __future__ import annotations

import numpy as np

from wsi_ncmi.store.h5 import read_feature_file
from wsi_ncmi.train.data import kept_patches

FACTOR = 4.0            # warn when the longest bag is this many times the mean one


def bag_length(source, slide_id: str) -> int:
    if source.cohort is not None:
        return source.cohort.length(slide_id)
    return int(read_feature_file(source.root / f"{slide_id}.h5", features=False).features.shape[0])


def padding_warning(cfg, task, store) -> str | None:
    """The warning line, or None when batches are single bags or padding costs little."""
    bs = cfg.batch_size
    recs = task.split("train")
    if bs <= 1 or len(recs) < 2:
        return None
    n = kept_patches(np.array([bag_length(store.source, r.slide_id) for r in recs], dtype=np.int64),
                     cfg.patch_dropout, cfg.max_patches)
    longest, mean = int(n.max()), float(n.mean())
    if longest < FACTOR * mean:
        return None
    gb = lambda rows: rows * store.dim * 4 / 2**30
    return (f"warning: --batch-size {bs} pads each step's bags to the longest one; {recs[int(n.argmax())].slide_id} "
            f"trains on {longest:,} patches, {longest / mean:.0f}x the mean ({mean:,.0f}), so its steps hold "
            f"{gb(bs * longest):.2f} GB of padded features (plus activations) for {gb(longest + (bs - 1) * mean):.2f} "
            f"GB of bags; use --batch-size 1 (no padding) or --max-patches {int(np.percentile(n, 90))}")
