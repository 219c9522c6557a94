"""torchrun on CPU (gloo, 2 ranks): sharded extraction with one summary, kill-and-rerun, parallel seeds."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wsi_ncmi.distributed import World
from wsi_ncmi.mil.synthetic import make_cohort
from wsi_ncmi.store import read_feature_file
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.run import run_training

from conftest import ROOT, make_tissue_slide

FAST = ["--encoder", "efficientnet_lite0", "--patch-size", "224", "--workers", "0", "--quiet"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "wsi_ncmi", *args]


def _cohort(d: Path, n: int, mpp: float = 0.5) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_tissue_slide(d / f"slide_{i}.tiff", mpp, [(100, 100, 700 + 20 * i, 560)], width_um=1000,
                          height_um=800, seed=i)
    return d


def _merged(out: Path) -> dict:
    logs = sorted((out / "logs").glob("extract-*-merged.json"), key=os.path.getmtime)
    return json.loads(logs[-1].read_text())


def test_world_shares_are_disjoint_and_cover_everything():
    items = list(range(11))
    shares = [World(r, 3).share(items) for r in range(3)]
    assert sorted(x for s in shares for x in s) == items and shares[1] == [1, 4, 7, 10]
    assert World().share(items) == items and not World().distributed


def test_finish_leaves_no_gloo_threads_behind(tmp_path):
    """A group that outlives ``finish`` aborts the process at exit now and then; none may be left."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import glob, torch\n"
        "from wsi_ncmi.distributed import finish, gather, start, world\n"
        "from wsi_ncmi.train.trainer import fused_if_possible\n"
        "w = world(); start(w)\n"
        "fused_if_possible(torch.optim.AdamW, [torch.nn.Parameter(torch.ones(2))])   # what every Trainer builds\n"
        "gather(w, w.rank); finish(w)\n"
        "names = [open(t).read().strip() for t in glob.glob('/proc/self/task/*/comm')]\n"
        f"open(f'{tmp_path}/rank{{w.rank}}.txt', 'w').write(str(sum('gloo' in n for n in names)))\n")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # one file per rank: two ranks printing to one stdout interleave their lines now and then
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0", "0"], res.stdout


def test_torchrun_extraction_does_each_slide_once_with_one_summary(tmp_path):
    d = _cohort(tmp_path / "slides", 6)
    out = tmp_path / "f"
    res = subprocess.run(torchrun("extract", str(d), "--out", str(out), *FAST), env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("extract: 6 slides: 6 done") == 1          # one summary, printed by rank 0
    assert "2 ranks" in res.stdout
    merged = _merged(out)
    assert sorted(r["slide_id"] for r in merged["results"]) == [f"slide_{i}" for i in range(6)]
    assert merged["counts"]["done"] == 6 and merged["tiles"] == sum(r["patches"] for r in merged["results"])
    per_rank = [json.loads(p.read_text()) for p in (out / "logs").glob("extract-*.json") if "merged" not in p.name]
    done = sorted(r["slide_id"] for log in per_rank for r in log["results"] if r["status"] == "done")
    assert done == [f"slide_{i}" for i in range(6)] and len(per_rank) == 2    # each slide by exactly one rank
    assert {tuple(sorted(r["slide_id"] for r in log["results"])) for log in per_rank} == {
        ("slide_0", "slide_2", "slide_4"), ("slide_1", "slide_3", "slide_5")}      # rank r: slides r, r+2, ...


def test_killed_rank_then_rerun_finishes_the_rest(tmp_path):
    d = _cohort(tmp_path / "slides", 8, mpp=0.25)
    out = tmp_path / "f"
    proc = subprocess.Popen(torchrun("extract", str(d), "--out", str(out), *FAST, "--batch-size", "8"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    victim = None
    while time.time() < deadline and victim is None:
        if list(out.glob("*.h5")):
            for lock in (out / ".locks").glob("*.lock"):
                with contextlib.suppress(OSError, ValueError):
                    victim = json.loads(lock.read_text())["pid"]
                    break
        time.sleep(0.05)
    assert victim is not None, "no rank was working when the first slide finished; make the slides larger"
    os.kill(victim, signal.SIGKILL)                  # one rank dies mid-slide; torchrun stops the other
    assert proc.wait(timeout=120) != 0
    finished = sorted(out.glob("*.h5"))
    assert 1 <= len(finished) < 8
    for p in finished:                               # what was written is complete
        ff = read_feature_file(p)
        assert ff.attrs["num_patches"] == len(ff.features) > 0
    res = subprocess.run(torchrun("extract", str(d), "--out", str(out), *FAST), env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    merged = _merged(out)
    assert sorted(r["slide_id"] for r in merged["results"]) == [f"slide_{i}" for i in range(8)]
    assert merged["counts"]["done"] == 8 - len(finished) and merged["counts"]["skipped"] == len(finished)
    assert len(list(out.glob("*.h5"))) == 8


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("bags"), n_slides=40, dim=16, bag_size=(30, 60), separation=6.0)


def _train_args(bags: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "csv", "--labels", str(bags / "labels.csv"), "--features", str(bags / "features"),
            "--out", str(out), "--epochs", "4", "--bootstrap", "20", "--quiet", *extra]


def test_parallel_seeds_match_the_seeds_run_one_by_one(bags, tmp_path):
    res = subprocess.run(torchrun(*_train_args(bags, tmp_path / "par", "--seeds", "3")), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("| test |") == 1 and "seeds in parallel" in res.stdout
    par = json.loads((tmp_path / "par" / "metrics.json").read_text())
    assert par["seeds"] == [0, 1, 2]
    cfg = TrainConfig.from_sources(None, task="csv", labels=str(bags / "labels.csv"), features=str(bags / "features"),
                                   out=str(tmp_path / "seq"), epochs=4, bootstrap=20, seeds=3, progress=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)                          # as torchrun's ranks (OMP_NUM_THREADS=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            seq = run_training(cfg)
    finally:
        torch.set_num_threads(n)
    for sp in ("val", "test"):
        for k in ("macro_f1", "auc", "balanced_accuracy", "accuracy"):
            assert par[sp][k]["mean"] == pytest.approx(seq[sp][k]["mean"], abs=1e-9), (sp, k)
            assert par[sp][k]["std"] == pytest.approx(seq[sp][k]["std"], abs=1e-9), (sp, k)
    for s in range(3):
        a = json.loads((tmp_path / "par" / f"seed_{s}" / "metrics.json").read_text())
        b = json.loads((tmp_path / "seq" / f"seed_{s}" / "metrics.json").read_text())
        assert a["test"]["confusion"] == b["test"]["confusion"] and a["best_epoch"] == b["best_epoch"]


def test_one_seed_on_two_ranks_trains_data_parallel(bags, tmp_path):
    res = subprocess.run(torchrun(*_train_args(bags, tmp_path / "ddp", "--loss", "ncmi")), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data-parallel" in res.stdout and res.stdout.count("| test |") == 1
    m = json.loads((tmp_path / "ddp" / "seed_0" / "metrics.json").read_text())
    assert 0 <= m["test"]["macro_f1"] <= 1 and (tmp_path / "ddp" / "seed_0" / "best.pt").is_file()
    hist = (tmp_path / "ddp" / "seed_0" / "history.csv").read_text().splitlines()
    assert len(hist) == 5                              # header + 4 epochs, written once (rank 0)
    before = (tmp_path / "ddp" / "seed_0" / "best.pt").read_bytes()
    res = subprocess.run(torchrun(*_train_args(bags, tmp_path / "ddp", "--loss", "ce", "--resume")), env=ENV,
                         capture_output=True, text=True, timeout=600)   # rank 0's refusal stops every rank
    assert res.returncode != 0 and res.stderr.count("--resume with changed settings: loss (ncmi -> ce)") == 2
    assert (tmp_path / "ddp" / "seed_0" / "best.pt").read_bytes() == before


def test_slurm_array_script_composes_shards_with_torchrun_ranks(tmp_path):
    d = _cohort(tmp_path / "slides", 6)
    out = tmp_path / "f"
    script = ROOT / "pipelines" / "slurm_extract.sbatch"
    for task in ("0", "1"):                         # the two tasks of `sbatch --array=0-1`, one after the other
        env = dict(ENV, SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT="2", GPUS_PER_NODE="2",
                   EXTRA_ARGS="--patch-size 224 --workers 0 --quiet",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        res = subprocess.run(["bash", str(script), str(d), str(out), "efficientnet_lite0"], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        merged = _merged(out)
        assert merged["shard"] == f"{task}/2 x 2 ranks"
        assert sorted(r["slide_id"] for r in merged["results"]) == [f"slide_{i}" for i in range(int(task), 6, 2)]
    assert sorted(p.stem for p in out.glob("*.h5")) == [f"slide_{i}" for i in range(6)]
