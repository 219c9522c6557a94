"""The extraction run: which slides to do, and the pipeline that does them.

Pipeline (one process per GPU; ``torchrun`` starts one per GPU and shares the slides out):

    planner threads --(PatchTask queue)--> DataLoader workers --(uint8 batches, pinned)-->
    encoder on the device --(async copy to pinned host buffers)--> HDF5 writer (main thread)

Each slide is protected by a lock file and written to ``.partial/`` first; the finished file is
renamed into place, the lock released, and only then is the slide counted as done. A failure of
one slide (unreadable, no mpp, read error mid-slide) is recorded with its reason and the cohort
goes on. Rerunning skips every slide whose ``<slide_id>.h5`` exists with the same settings.
"""

from __future__ import annotations

import queue as queue_mod
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wsi_ncmi.device import resolve_device, resolve_precision
from wsi_ncmi.distributed import finish, gather, world
from wsi_ncmi.errors import SlideError, WsiNcmiError
from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.extract.dataset import make_task_loader, plan_tasks
from wsi_ncmi.extract.locks import HOST, SlideLock, _pid_alive
from wsi_ncmi.extract.plan import (SlidePlan, plan_slide, settings_fingerprint,
                                  tissue_fraction_dataset, tissue_source_for)
from wsi_ncmi.extract.summary import RunSummary, SlideResult
from wsi_ncmi.slides.mpp import load_mpp_csv
from wsi_ncmi.slides.open import discover_slides, slide_id_for
from wsi_ncmi.store.h5 import FeatureWriter, parse_partial_name, read_attrs
from wsi_ncmi.store.provenance import FINGERPRINT_DEFAULTS

PLAN_THREADS = 2
PLAN_LOOKAHEAD = 3   # slides planned (and locked) ahead of the readers: enough to hide planning,
                     # few enough that concurrent processes share the cohort


def _clean_partials(partial_dir: Path) -> None:
    """Remove temp files left by dead processes on this host (others clean their own)."""
    if not partial_dir.is_dir():
        return
    for f in partial_dir.iterdir():
        parsed = parse_partial_name(f)
        if parsed and parsed[1] == HOST and not _pid_alive(parsed[2]):
            f.unlink(missing_ok=True)


def _existing_mismatch(h5: Path, fingerprint: str) -> str | None:
    """None if ``h5`` may be kept as this slide's features, else what differs."""
    import json

    try:
        attrs = read_attrs(h5)
    except OSError as exc:
        return f"{h5} exists but cannot be read ({exc}); delete it to extract the slide again"
    old = attrs.get("settings_fingerprint")
    if not old:
        return None  # a CLAM/TRIDENT file the user put there: never overwrite it
    old_d = old if isinstance(old, dict) else json.loads(old)
    new_d = json.loads(fingerprint)
    old_d = {**FINGERPRINT_DEFAULTS, **old_d}   # files from before a key existed had its default
    export_sha = attrs.get("tissue_export_sha256")
    if export_sha and new_d.get("tissue_source") == f"geojson:{export_sha}":
        new_d["tissue_source"] = old_d["tissue_source"]   # the file's own unedited tissue export
    diff = [f"{k}={old_d.get(k)!r} (now {v!r})" for k, v in new_d.items() if old_d.get(k) != v]
    if not diff:
        return None
    return (f"{h5} was extracted with other settings: {', '.join(diff)}; "
            "use another --out folder or delete the old files")


@dataclass
class _InFlight:
    key: int
    plan: SlidePlan
    lock: SlideLock
    t0: float
    writer: FeatureWriter | None = None
    failed: bool = False
    bar: object = None
    slot: int = -1


class _Extraction:
    """One run of the pipeline over ``todo`` slides; results go to ``summary``."""

    def __init__(self, cfg: ExtractConfig, todo: list[Path], summary: RunSummary, csv_mpp, encoder=None):
        self.cfg, self.todo, self.summary, self.csv_mpp = cfg, todo, summary, csv_mpp
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        if encoder is None:
            from wsi_ncmi.encoders import create_encoder

            encoder = create_encoder(cfg.encoder, cfg.weights, device=self.device)
        self.encoder = encoder.to(self.device)
        if cfg.encoder_input == "patch":
            self.encoder.use_patch_input()
        if cfg.compile_on(self.device.type):
            self.encoder.use_compile()
        self.precision = resolve_precision(cfg.precision, self.encoder.spec.precision, self.device)
        self.batch = cfg.batch_size or (256 if self.device.type == "cuda" else 32)
        self.workers = cfg.resolved_workers(world().local_size)
        # raw JPEG tiles are decoded where the encoder runs when that is a GPU (nvjpeg), else in the workers
        self.decode_on = "device" if self.device.type == "cuda" else "worker"
        self.cutter = None
        if self.decode_on == "device":
            from wsi_ncmi.slides.device_cut import DeviceCutter

            self.cutter = DeviceCutter(self.device)
        summary.encoder, summary.device = cfg.encoder, str(self.device)
        summary.precision, summary.batch_size, summary.workers = self.precision, self.batch, self.workers
        summary.compile = self.encoder.compile_state
        self.inflight: dict[int, _InFlight] = {}
        self.guard = threading.Lock()
        self.stop = threading.Event()
        self.feeder_error: BaseException | None = None
        self.slots: list[bool] = []
        self.bars_off = None if cfg.progress else True  # tqdm's disable: None = only on a terminal

    # ---- feeder thread: lock, plan, enqueue ------------------------------------------------
    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.tasks.put(item, timeout=0.5)
                return True
            except queue_mod.Full:
                continue
        return False

    def _record(self, result: SlideResult) -> None:
        with self.guard:
            self.summary.results.append(result)
        self.slide_bar.update(1)

    def _feed(self) -> None:
        pending: deque = deque()
        nxt = 0
        pool = ThreadPoolExecutor(max_workers=PLAN_THREADS, thread_name_prefix="plan")
        try:
            def top_up():
                nonlocal nxt
                while nxt < len(self.todo) and len(pending) < PLAN_LOOKAHEAD and not self.stop.is_set():
                    path, key = self.todo[nxt], nxt
                    nxt += 1
                    sid = slide_id_for(path)
                    lock = SlideLock(self.out / ".locks", sid, self.cfg.lock_stale_after)
                    if not lock.acquire():
                        self._record(SlideResult(sid, str(path), "busy", message="locked by another process"))
                        continue
                    if (self.out / f"{sid}.h5").exists():  # finished elsewhere since we listed it
                        lock.release()
                        self._record(SlideResult(sid, str(path), "skipped"))
                        continue
                    pending.append((key, path, lock, pool.submit(plan_slide, path, self.cfg, self.csv_mpp, self.out)))

            top_up()
            while pending and not self.stop.is_set():
                key, path, lock, fut = pending.popleft()
                try:
                    plan = fut.result()
                except SlideError as exc:
                    lock.release()
                    self._record(SlideResult(slide_id_for(path), str(path), "failed", exc.reason, str(exc)))
                    top_up()
                    continue
                except Exception as exc:  # an unexpected library error on one slide
                    lock.release()
                    self._record(SlideResult(slide_id_for(path), str(path), "failed", "error",
                                             f"{path}: {type(exc).__name__}: {exc}"))
                    top_up()
                    continue
                with self.guard:
                    self.inflight[key] = _InFlight(key, plan, lock, time.perf_counter())
                self.tile_bar.total = (self.tile_bar.total or 0) + len(plan.grid)
                self.tile_bar.refresh()
                top_up()
                for task in plan_tasks(key, plan, self.batch, self.decode_on):
                    if not self._put(task):
                        break
            for _, _, lock, fut in pending:  # stopped early
                fut.cancel()
                lock.release()
        except BaseException as exc:
            self.feeder_error = exc
        finally:
            pool.shutdown(wait=True)
            for _ in range(max(1, self.workers)):
                if not self._put(None):
                    break

    # ---- main thread: encode and write ------------------------------------------------------
    def _fail(self, st: _InFlight, reason: str, message: str) -> None:
        st.failed = True
        if st.writer is not None:
            st.writer.abort()
        st.lock.release()
        self._close_bar(st)
        self._record(SlideResult(st.plan.slide_id, str(st.plan.path), "failed", reason, message,
                                 seconds=time.perf_counter() - st.t0))

    def _close_bar(self, st: _InFlight) -> None:
        if st.bar is not None:
            st.bar.close()
            self.slots[st.slot] = False
            st.bar = None

    def _open_bar(self, st: _InFlight) -> None:
        if self.bars_off is True:
            return
        slot = next((i for i, used in enumerate(self.slots) if not used), len(self.slots))
        if slot == len(self.slots):
            self.slots.append(True)
        self.slots[slot] = True
        st.slot = slot
        st.bar = tqdm(total=len(st.plan.grid), desc=st.plan.slide_id[:28], unit="tile", position=2 + slot,
                      leave=False, dynamic_ncols=True, disable=self.bars_off)

    def _write(self, st: _InFlight, start: int, feats) -> None:
        if st.failed:
            return
        plan = st.plan
        try:
            if st.writer is None:
                attrs = dict(plan.attrs, encoder=self.cfg.encoder, encoder_dim=self.encoder.dim,
                             weights=self.encoder.weights_id, preprocessing=self.encoder.spec.describe(),
                             precision=self.precision, device=str(self.device),
                             compile=self.encoder.compile_state)   # runtime only: not in the fingerprint
                st.writer = FeatureWriter(self.out / f"{plan.slide_id}.h5", self.out / ".partial", plan.grid.coords,
                                          self.encoder.dim, self.cfg.feature_dtype, attrs, plan.coords_attrs,
                                          extra={"tissue_fraction": tissue_fraction_dataset(plan.grid)})
                self._open_bar(st)
            st.writer.write(start, feats)
        except OverflowError as exc:
            return self._fail(st, "overflow", f"{plan.path}: {exc}")
        except FloatingPointError as exc:
            return self._fail(st, "nan", f"{plan.path}: {exc}")
        st.lock.refresh()
        if st.bar is not None:
            st.bar.update(len(feats))
        self.tile_bar.update(len(feats))
        if st.writer.complete:
            st.writer.commit()
            st.lock.release()
            self._close_bar(st)
            self._record(SlideResult(plan.slide_id, str(plan.path), "done", patches=len(plan.grid),
                                     seconds=time.perf_counter() - st.t0, reader=plan.reader))
            with self.guard:
                self.inflight.pop(st.key, None)

    def run(self) -> None:
        W = self.workers
        self.tasks, loader = make_task_loader(W, self.device.type == "cuda", maxsize=max(8, 4 * max(1, W)))
        it = iter(loader)  # fork the workers before any thread (tqdm's monitor, planners) starts
        self.slide_bar = tqdm(total=len(self.todo), desc="slides", unit="slide", position=0,
                              dynamic_ncols=True, disable=self.bars_off)
        self.tile_bar = tqdm(total=0, desc="tiles", unit="tile", position=1, dynamic_ncols=True,
                             smoothing=0.05, disable=self.bars_off)
        feeder = threading.Thread(target=self._feed, name="feeder", daemon=True)
        feeder.start()
        cuda = self.device.type == "cuda"
        host_bufs = [torch.empty((self.batch, self.encoder.dim), dtype=torch.float32, pin_memory=True)
                     for _ in range(2)] if cuda else None
        pending = None  # (state, start, host tensor, event): copied back while the next batch runs
        turn = 0
        try:
            for item in it:
                with self.guard:
                    st = self.inflight.get(item["key"])
                if st is None or st.failed:
                    continue
                if "error" in item:
                    self._fail(st, "read-error",
                               f"{st.plan.path}: read error in patch rows {item['start']}-"
                               f"{item['start'] + self.batch - 1} ({item['error']}); the file is damaged: "
                               "copy or scan it again")
                    continue
                if "packed" in item:
                    try:        # a tile the device decoder rejects fails its slide, never the cohort
                        imgs = self.cutter(item["key"], item["packed"])
                    except Exception as exc:
                        self._fail(st, "read-error",
                                   f"{st.plan.path}: cannot decode the tiles of patch rows {item['start']}-"
                                   f"{item['start'] + self.batch - 1} ({type(exc).__name__}: {exc}); the file is "
                                   "damaged: copy or scan it again, or pass --reader openslide")
                        continue
                else:
                    imgs = item["images"].to(self.device, non_blocking=True)
                feats = self.encoder(imgs, self.precision)
                if cuda:
                    buf = host_bufs[turn][: len(feats)]
                    turn ^= 1
                    buf.copy_(feats, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                    if pending is not None:
                        pending[3].synchronize()
                        self._write(pending[0], pending[1], pending[2].numpy())
                    pending = (st, item["start"], buf, ev)
                else:
                    self._write(st, item["start"], feats.numpy())
            if pending is not None:
                pending[3].synchronize()
                self._write(pending[0], pending[1], pending[2].numpy())
                pending = None
        finally:
            self.summary.compile = self.encoder.compile_state   # "eager (...)" if compiling failed
            self.stop.set()
            feeder.join(timeout=30)
            with self.guard:
                left = list(self.inflight.values())
            for st in left:
                if not st.failed:
                    if st.writer is not None and st.writer.complete:
                        continue
                    self._fail(st, "incomplete", f"{st.plan.path}: the run stopped before this slide finished; "
                                                 "run the same command again to resume")
            self.tile_bar.close()
            self.slide_bar.close()
            del it
        if self.feeder_error is not None:
            raise self.feeder_error


def run_extraction(cfg: ExtractConfig, encoder=None) -> RunSummary:
    """Extract every slide of ``cfg.slides`` (this shard) that has no feature file yet.

    ``encoder``: an already built ``Encoder`` to use instead of building ``cfg.encoder`` (keeps a
    loaded model across runs in a notebook; the benchmark times one model in every stage).

    Under torchrun each rank takes the slides rank, rank + world, ... of this shard (so ``--shard``
    of a job array and torchrun's ranks compose), on its own GPU; the lock files keep processes on
    other nodes from doing a slide twice. Every rank returns the merged summary of all ranks.
    """
    w = world()
    if w.distributed:
        cfg = replace(cfg, device=w.device(cfg.device), progress=cfg.progress and w.is_main)
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_mpp = load_mpp_csv(cfg.mpp_csv) if cfg.mpp_csv else None
    paths = discover_slides(cfg.slides, exclude=[out])
    if not paths:
        raise WsiNcmiError(f"{', '.join(cfg.slides)}: no slides found (.svs, .ndpi, .mrxs, .tif(f), .dcm, "
                           ".scn, .bif, .png/.jpg with --slide-mpp ...)")
    i, n = cfg.shard_index
    shard_paths = paths[i::n]
    paths = w.share(shard_paths)
    summary = RunSummary(out=str(out), shard=cfg.shard + (f" rank {w.rank}/{w.size}" if w.distributed else ""))
    _clean_partials(out / ".partial")
    todo: list[Path] = []
    for p in paths:
        sid = slide_id_for(p)
        h5 = out / f"{sid}.h5"
        if h5.exists():
            try:
                fingerprint = settings_fingerprint(cfg, tissue_source_for(cfg, sid))
            except OSError as exc:
                summary.results.append(SlideResult(sid, str(p), "failed", "bad-geojson",
                                                   f"{cfg.geojson_for(sid)}: cannot read ({exc}); fix its "
                                                   "permissions or remove it"))
                continue
            problem = _existing_mismatch(h5, fingerprint)
            if problem is None:
                summary.results.append(SlideResult(sid, str(p), "skipped"))
            else:
                summary.results.append(SlideResult(sid, str(p), "failed", "settings-mismatch", problem))
        else:
            todo.append(p)
    t0 = time.perf_counter()
    if todo:
        extraction = _Extraction(cfg, todo, summary, csv_mpp, encoder)   # loads the encoder
        t0 = time.perf_counter()                                 # tiles/s counts the pipeline only
        extraction.run()
    summary.seconds = time.perf_counter() - t0
    order = {slide_id_for(p): k for k, p in enumerate(paths)}
    summary.results.sort(key=lambda r: order.get(r.slide_id, 0))
    summary.save(out / "logs")
    if not w.distributed:
        return summary
    merged = RunSummary.merge(gather(w, summary), [slide_id_for(p) for p in shard_paths], cfg.shard)
    if w.is_main:
        merged.save(out / "logs", "-merged")
    finish(w)
    return merged
