"""A run folder's identity, its training lock and the paths it records.

Why: a run folder is the only record of what was trained, so it must never hold the work of two
settings, of two processes at once, or paths that mean something else from another directory.

* ``run.json`` records the identity of the run: every training setting except those allowed to
  change on ``--resume`` (``MAY_CHANGE_ON_RESUME``), the sha256 of the label file, a digest of the
  task (slide ids, labels, splits) and a cheap fingerprint of the features the task reads (name,
  size and mtime of each slide's ``.h5``, or the zarr cache's own record of them). The comparison
  is generic over the settings dict, so settings added later are part of the identity too.
* An existing folder with another identity is refused (``--overwrite`` replaces it, removing only
  what a run writes); ``--resume`` with changed settings is refused naming them; a folder that is
  not a run folder is never written into.
* While training, ``.train.lock`` (the extraction's O_EXCL ``SlideLock``: host, pid, heartbeat,
  stale takeover after kill -9) keeps a second training (and ``evaluate``) out of the folder.
* Paths are stored absolute; relative paths of older runs are read against the run folder first.
  The identity compares what the paths hold (label digest, task digest, feature fingerprint), not
  the paths themselves, so a project moved with its files (``mv``, ``cp -a``) still resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.extract.locks import HOST, SlideLock, is_stale, read_owner

RUN_FILE = "run.json"
LOCK_NAME = ".train"                 # -> .train.lock
LOCK_STALE_AFTER = 600.0             # another host's lock untouched this long is stale (heartbeat 30 s)
PATH_KEYS = ("labels", "slides", "features")
# settings that may change on --resume: they do not change what a finished epoch or seed means.
# More --epochs stretches the cosine schedule of unfinished seeds to the new length from where they
# stopped; finished seeds are kept as they are.
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "patience", "min_epochs", "ncmi_means", "progress", "device", "bootstrap",
                                  "ram_gb", "resume", "overwrite", "seeds", "allow_missing"})   # stopping/bookkeeping only
NOT_IDENTITY = MAY_CHANGE_ON_RESUME | {"out"}
DERIVED = ("labels_sha256", "task_sha256", "features_fingerprint")
RUN_OUTPUTS = ("config.yaml", RUN_FILE, "metrics.json", "metrics.md", "evaluate", "heatmaps", "lr_search",
               "lr_search.json", "folds.csv", "predictions_oof.csv", "features.json")


# ---- paths -------------------------------------------------------------------------------------
def absolute_paths(cfg):
    """The config with labels/slides/features/out made absolute (how they are stored)."""
    return replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in PATH_KEYS + ("out",) if getattr(cfg, k)})


def load_run_config(run: str | Path, require: tuple[str, ...] = PATH_KEYS, **given):
    """A run's ``TrainConfig`` with its paths resolved: flags given (``labels=``, ``slides=``,
    ``features=``) win; else the recorded path (absolute, or relative to the run folder; an older
    run's path relative to the current directory is still found, with a note). A label file that
    is not the one recorded in ``run.json`` is refused unless given explicitly."""
    import yaml

    from wsi_ncmi.train.config import saved_config

    run = Path(run)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        if run.name.startswith("seed_") and (run.parent / "config.yaml").is_file():
            raise WsiNcmiError(f"{run}: a seed folder; pass its run folder {run.parent}")
        raise WsiNcmiError(f"{run}: not a training run folder (no config.yaml); pass the --out of `wsi-ncmi train`")
    try:
        cfg = saved_config(cfg_file, resume=False)      # settings newer than the run: what its version did
    except (yaml.YAMLError, TypeError, ValueError, AttributeError) as exc:
        raise WsiNcmiError(f"{cfg_file}: unreadable ({str(exc).splitlines()[0]}); restore it, or train the run "
                           "again") from None
    values = {}
    for key in PATH_KEYS:
        flag = given.get(key)
        if flag:
            values[key] = os.path.abspath(flag)
            continue
        rec = getattr(cfg, key)
        if not rec:
            continue
        p = Path(rec)
        if not p.is_absolute():
            if (run / p).exists() or not p.exists():
                p = run / p
            else:
                print(f"note: {cfg_file} gives {key} '{rec}' relative to where training ran; using "
                      f"{p.absolute()} from the current directory (pass --{key} to be explicit)")
        values[key] = str(p.absolute())
        if key in require and not p.exists():
            raise WsiNcmiError(f"{p}: the {key} of this run (recorded in {cfg_file}) not found; pass --{key} with "
                               "its new location")
    cfg = replace(cfg, **values)
    ident = read_identity(run)
    if ident and not given.get("labels") and cfg.labels and "labels" in require:
        want, have = ident.get("labels_sha256"), file_sha256(cfg.labels)
        if want and have != want:
            raise WsiNcmiError(f"{cfg.labels}: not the label file this run was trained on (its sha256 differs "
                               f"from the one in {run / RUN_FILE}); pass --labels with the file to score against")
    return cfg


def settings_folder(run: Path) -> Path:
    """The folder whose config.yaml holds ``run``'s settings: itself, or for a fold folder of a
    cross-validation run (``<run>/fold_<k>``, which has its own seeds but not its own settings) the run."""
    run = Path(run)
    if not (run / "config.yaml").is_file() and run.name.startswith("fold_") and (run.parent / "config.yaml").is_file():
        return run.parent
    return run


# ---- identity ----------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def features_fingerprint(source, slide_ids: list[str]) -> str:
    """Cheap: name, size and mtime of each slide's .h5, read from the files or from the zarr cache's
    record of them. The same rows either way, so packing the features between training and
    ``--resume`` (or a cache going stale) does not change the run's identity."""
    rows = []
    for sid in sorted(slide_ids):
        if source.cohort is not None:
            rows.append([sid, *list(source.cohort.sources.get(sid) or [None, None])])
        else:
            st = (source.root / f"{sid}.h5").stat()
            rows.append([sid, st.st_size, st.st_mtime])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:20]


def identity(cfg, task, store) -> dict:
    ident = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY}
    ident["labels_sha256"] = file_sha256(cfg.labels) if cfg.labels else None
    ident["task_sha256"] = identity_task_digest(task)
    ident["features_fingerprint"] = features_fingerprint(store.source, [s.slide_id for s in task.slides])
    return ident


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every identity key that differs. A key an older run lacks (a setting
    added to TrainConfig later) stands for what that version did (``config.recorded_default``)."""
    from wsi_ncmi.train.config import recorded_default

    out = []
    for k in sorted(set(old) | set(new)):
        if k in NOT_IDENTITY or k in PATH_KEYS or (k in DERIVED and k not in old):   # paths: through digests
            continue
        if k.startswith("ncmi_") and not any("ncmi" in str(d.get("loss")) for d in (old, new)):
            continue                                   # a loss without NCMI never reads its settings
        a, b = old.get(k, recorded_default(k, old)), new.get(k)
        if a is None and k == "ncmi_temperature":      # null: the default of the version that wrote it
            a = recorded_default(k, old)
        if a != b:
            out.append(f"{k} ({'changed' if k in DERIVED else f'{a} -> {b}'})")
    return out


def saved_differences(run: Path, cfg) -> list[str]:
    """``differences`` between the settings in ``run/config.yaml`` and ``cfg`` (paths and the settings
    that may change on resume aside): whether a finished run can stand for ``cfg``. For scripts that
    reuse finished runs (the benchmarks) without opening them for training."""
    import yaml

    saved = (yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}).get("train") or {}
    return differences(saved, replace(cfg).validate().to_dict())   # as training would resolve it ("auto")


def refuse_changed_task(run: Path, cfg, task) -> None:
    """``evaluate`` scores the splits the run was trained on, or refuses: a label file edited since,
    or splits drawn differently (a newer wsi-ncmi draws whole patients), would put training slides
    in val or test without a word. Runs from before run.json carry no digest: a note says so."""
    ident = read_identity(run)
    if not ident or not ident.get("task_sha256"):
        print(f"note: {run} predates run records; its val/test slides cannot be checked against those it was "
              "trained on (splits drawn by the task may differ between versions)")
        return
    if identity_task_digest(task) != ident["task_sha256"]:
        raise WsiNcmiError(f"{run}: the slides, labels or splits of {cfg.labels or cfg.slides} differ from those "
                           f"this run was trained on (recorded in {run / RUN_FILE}); pass --labels with the label "
                           "file of the training, or train again")


def identity_task_digest(task) -> str:
    return hashlib.sha256(json.dumps(
        [task.name, task.classes, [[s.slide_id, s.label, s.split] for s in task.slides]]).encode()).hexdigest()[:20]


def read_identity(run: Path) -> dict | None:
    f = Path(run) / RUN_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())["identity"]
    except (ValueError, KeyError, TypeError, OSError):
        raise WsiNcmiError(f"{f}: damaged run record; pass --overwrite to train the run again from scratch") from None


def _is_legacy_run(out: Path) -> bool:
    """A run folder from before run.json: config.yaml with a ``train:`` section and a seed folder.
    Anything less is not ours, and is never written into or cleaned up."""
    import yaml

    if not (out / "config.yaml").is_file() or not any(d.is_dir() for d in out.glob("seed_*")):
        return False
    try:
        data = yaml.safe_load((out / "config.yaml").read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("train"), dict)


def _legacy_identity(out: Path) -> dict:
    """Identity of a run folder from before run.json: its config.yaml, paths as typed then."""
    import yaml

    try:
        data = yaml.safe_load((out / "config.yaml").read_text()) or {}
        old = dict(data.get("train", data))
    except (yaml.YAMLError, OSError, AttributeError, TypeError):
        raise WsiNcmiError(f"{out / 'config.yaml'}: unreadable; pass --overwrite to train the run again") from None
    for k in PATH_KEYS:
        if old.get(k):
            old[k] = os.path.abspath(old[k])
    return old


def _work(out: Path) -> list[str]:
    """What a folder holds that training would lose: 'seed_0 finished', 'fold_1/seed_0 started'."""
    said = []
    for d in sorted(out.glob("seed_*")) + sorted(out.glob("fold_*/seed_*")):
        name = d.relative_to(out).as_posix()
        if (d / "metrics.json").exists():
            said.append(f"{name} finished")
        elif (d / "last.pt").exists():
            said.append(f"{name} started")
    return said


def _remove_run(out: Path) -> None:
    """--overwrite: remove what a run writes (and only that)."""
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for d in list(out.glob("seed_*")) + list(out.glob("fold_*")):
        if d.is_dir() and d.name.split("_", 1)[1].isdigit():
            shutil.rmtree(d)


# ---- the lock ----------------------------------------------------------------------------------
_held: list["RunLock"] = []


class RunLock:
    """``SlideLock`` on ``<run>/.train.lock`` with a heartbeat thread (touches it every 30 s)."""

    def __init__(self, out: Path):
        self.lock = SlideLock(out, LOCK_NAME, stale_after=LOCK_STALE_AFTER)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.lock.acquire():
            return False
        self._thread = threading.Thread(target=self._beat, name="wsi-ncmi-run-lock", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(30.0):
            self.lock.refresh(0.0)

    def release(self) -> None:
        self._stop.set()
        self.lock.release()


def training_owner(run: Path) -> dict | None:
    """The live owner of a run's training lock, or None."""
    path = Path(run) / f"{LOCK_NAME}.lock"
    if not path.exists() or is_stale(path, LOCK_STALE_AFTER):
        return None
    return read_owner(path) or {}


def _owner_text(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner["started"])) if "started" in owner else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {started}"


def refuse_while_training(run: Path, what: str) -> None:
    owner = training_owner(run)
    if owner is not None:
        raise WsiNcmiError(f"{run}: a training is writing this run folder ({_owner_text(owner)}); {what} it when "
                           "that training has finished")


def releases_run_lock(fn):
    """Decorator: whatever way the training function ends, the run locks it took are released."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = len(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_held) > n:
                _held.pop().release()
    return wrapper


# ---- opening a run folder for training -----------------------------------------------------------
def _usable_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise WsiNcmiError(f"--out {out}: a file, not a folder; pass a new folder (or a run folder of these settings)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiNcmiError(f"--out {out}: cannot create the run folder ({exc.strerror}); pass a writable --out") \
            from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise WsiNcmiError(f"--out {out}: not writable; pass a writable --out")


def open_run(cfg, task, store, world=None) -> None:
    """Check the folder against this run's identity, take its lock and record the identity.

    Call after the task and features were loaded (nothing is written before every input is
    known good). Under torchrun rank 0 does this while the other ranks wait (they would otherwise
    create seed folders first), and every rank stops with rank 0's error if there is one."""
    from wsi_ncmi.distributed import gather

    if world is None or not world.distributed:
        return _open_run(cfg, task, store)
    error = None
    if world.is_main:
        try:
            _open_run(cfg, task, store)
        except WsiNcmiError as exc:
            error = str(exc)
        except Exception as exc:          # never leave the other ranks waiting on a rank that died
            error = f"{cfg.out}: cannot open the run folder ({type(exc).__name__}: {exc})"
    error = gather(world, error)[0]
    if error is not None:
        raise WsiNcmiError(error)


def _open_run(cfg, task, store) -> None:
    from wsi_ncmi.train.config import recorded_default

    out = Path(cfg.out)
    _usable_folder(out)
    lock = RunLock(out)
    try:
        got = lock.acquire()
    except OSError as exc:
        raise WsiNcmiError(f"--out {out}: cannot write the run lock ({exc.strerror}); pass a writable --out") from None
    if not got:
        owner = read_owner(lock.lock.path) or {}
        raise WsiNcmiError(f"{out}: another training is writing this run folder ({_owner_text(owner)}); wait for it "
                           "to finish, or pass another --out")
    _held.append(lock)
    new = identity(cfg, task, store)
    entries = [p.name for p in out.iterdir() if p.name != f"{LOCK_NAME}.lock"]
    record: dict = {}
    if (out / RUN_FILE).is_file() or _is_legacy_run(out):
        old = read_identity(out) if (out / RUN_FILE).is_file() else _legacy_identity(out)
        if (out / RUN_FILE).is_file():
            record = json.loads((out / RUN_FILE).read_text())
        diff = differences(old, new)
        work = _work(out)
        if cfg.overwrite or (diff and not work):   # nothing trained yet: nothing to lose or to mix
            _remove_run(out)
            record = {}
            print(f"note: {'--overwrite: ' if cfg.overwrite else ''}removed the previous run in {out}"
                  + (f" ({', '.join(work)})" if work else " (no epoch finished)"))
        elif diff and cfg.resume:
            older = "".join(f" --{k.replace('_', '-')} {recorded_default(k, old)}" for k in sorted(new)
                            if k not in old and k not in DERIVED and recorded_default(k, old) != new[k])
            rule = (" To score the trained models by another prediction rule, `wsi-ncmi evaluate "
                    f"{out} --ncmi-predict RULE` needs no training." if any(d.startswith("ncmi_predict ") for d in diff)
                    else "")
            raise WsiNcmiError(
                f"{out}: --resume with changed settings: {', '.join(diff)}; only "
                f"{', '.join(sorted(MAY_CHANGE_ON_RESUME - {'resume', 'overwrite'}))} may change on --resume. Resume "
                f"with the run's own settings (`wsi-ncmi train --config {out / 'config.yaml'} --resume{older}`), or "
                f"pass --overwrite to train it again from scratch (or another --out).{rule}")
        elif diff:
            raise WsiNcmiError(
                f"{out}: holds a run of other settings ({', '.join(diff)}); pass another --out, or --overwrite to "
                "replace that run")
        elif work and not cfg.resume:
            raise WsiNcmiError(
                f"{out}: already holds this run ({', '.join(work)}); pass --resume to continue it (finished seeds are "
                "kept), or --overwrite to train it again from scratch")
        elif record:
            was = record.get("settings", {})
            changed = [f"{k} {was[k]} -> {getattr(cfg, k)}" for k in sorted(was)
                       if k in ("epochs", "patience", "seeds") and was[k] != getattr(cfg, k)]
            if changed:
                print(f"note: resuming with {', '.join(changed)}: finished seeds are kept as they are; unfinished "
                      "seeds continue under the new settings")
    elif entries:
        raise WsiNcmiError(
            f"--out {out}: not empty and not a wsi-ncmi run folder (holds {', '.join(sorted(entries)[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); pass a new or empty folder. Nothing was changed")
    cfg.overwrite = False   # consumed here: a config.yaml carrying it would replace the run via --config
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    settings = {k: v for k, v in cfg.to_dict().items() if k in MAY_CHANGE_ON_RESUME}
    history = record.get("history", []) + [{"time": now, "action": "resumed" if record else "created",
                                             "host": HOST, "pid": os.getpid(), "settings": settings}]
    doc = {"format": "wsi-ncmi-run", "version": 1, "identity": new, "settings": settings, "history": history}
    tmp = out / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / RUN_FILE)
