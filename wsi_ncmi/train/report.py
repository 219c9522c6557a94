"""``wsi-ncmi report``: one comparison table per task over finished training runs.

Why its own module: every input is checked before anything is printed or written, so a seed
folder, an unfinished run, a damaged metrics.json or a folder as ``--out`` is a one-line error
naming the path and the fix, and runs of different tasks are never merged under one title.
"""

from __future__ import annotations

import json
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError

NEEDED = ("task", "model", "loss", "seeds", "test")


def load_run_metrics(run: str | Path) -> dict:
    run = Path(run)
    f = run / "metrics.json"
    if run.name.startswith("seed_") and (run.parent / "config.yaml").is_file():
        raise WsiNcmiError(f"{run}: a seed folder; pass its run folder {run.parent}")
    if not f.is_file():
        raise WsiNcmiError(f"{run}: no metrics.json; pass the --out folder of a finished `wsi-ncmi train` run")
    try:
        agg = json.loads(f.read_text())
    except (ValueError, OSError) as exc:
        raise WsiNcmiError(f"{f}: unreadable ({exc}); rerun `wsi-ncmi evaluate {run}` or the training with --resume") \
            from None
    if isinstance(agg, dict) and "test" not in agg and "oof" in agg:
        agg = dict(agg, test=agg["oof"])   # cross-validation without a held-out test: its out-of-fold sets
    missing = [k for k in NEEDED if not isinstance(agg, dict) or k not in agg]
    if missing:
        raise WsiNcmiError(f"{f}: not a run summary (no {', '.join(missing)}); pass the --out folder of a finished "
                           "`wsi-ncmi train` run")
    return agg


def report(runs: list[str], out: str | None = None) -> str:
    """The tables (one per task, in the order first seen); also written to ``out`` when given."""
    if out is not None:
        o = Path(out)
        if o.is_dir():
            raise WsiNcmiError(f"--out {o}: a folder; pass a file such as {o / 'report.md'}")
        if not o.parent.is_dir():
            raise WsiNcmiError(f"--out {o}: folder {o.parent} does not exist; create it or pass another path")
    by_task: dict[str, dict] = {}
    for run in runs:
        agg = load_run_metrics(run)
        results = by_task.setdefault(agg["task"], {})
        label = f"{agg['model']}/{agg['loss']}"
        results[label if label not in results else f"{label} ({run})"] = agg
    tables = [comparison_table(results, max(len(a["seeds"]) for a in results.values()), f"{task}: test split")
              for task, results in by_task.items()]
    text = "\n\n".join(tables)
    if out is not None:
        try:
            Path(out).write_text(text + "\n")
        except OSError as exc:
            raise WsiNcmiError(f"--out {out}: cannot write ({exc.strerror}); pass a writable file") from None
    return text


def comparison_table(results: dict, seeds: int, title: str) -> str:
    """Markdown table of several runs' test metrics, mean ± std over their seeds."""
    lines = [f"{title}, mean ± std over {seeds} seed(s)", "",
             "| loss | macro-F1 | macro AUC | balanced acc. | NCMI |", "|---|---|---|---|---|"]
    for loss, agg in results.items():
        t = agg["test"]
        lines.append(f"| {loss} | " + " | ".join(f"{t[k]['mean']:.3f} ± {t[k]['std']:.3f}"
                                                 for k in ("macro_f1", "auc", "balanced_accuracy", "ncmi")) + " |")
    return "\n".join(lines)
