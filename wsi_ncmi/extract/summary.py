"""What one extraction run did, per slide and in total; printed and saved as JSON."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str              # done | skipped | failed | busy (locked by another process)
    reason: str = ""
    message: str = ""
    patches: int = 0
    seconds: float = 0.0
    reader: str = ""         # raw-jpeg | openslide (done slides)


@dataclass
class RunSummary:
    out: str
    encoder: str = ""
    device: str = ""
    precision: str = ""
    batch_size: int = 0
    workers: int = 0
    compile: str = "off"     # the encoder's torch.compile state (Encoder.compile_state)
    shard: str = "0/1"
    results: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def tiles(self) -> int:
        return sum(r.patches for r in self.results if r.status == "done")

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def readers(self) -> dict[str, int]:
        """Done slides per patch reader (raw-jpeg, openslide)."""
        out: dict[str, int] = {}
        for r in self.results:
            if r.status == "done" and r.reader:
                out[r.reader] = out.get(r.reader, 0) + 1
        return out

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tiles=self.tiles, tiles_per_s=round(self.tiles_per_s, 2),
                 counts={s: self.count(s) for s in ("done", "skipped", "failed", "busy")},
                 readers=self.readers)
        return d

    @classmethod
    def merge(cls, parts: list["RunSummary"], order: list[str], shard: str) -> "RunSummary":
        """One summary of several ranks' runs of ``shard`` (torchrun): all slides in ``order``, wall time
        of the slowest."""
        first = parts[0]
        rank = {sid: k for k, sid in enumerate(order)}
        results = sorted((r for p in parts for r in p.results), key=lambda r: rank.get(r.slide_id, len(rank)))
        devices = sorted({p.device for p in parts if p.device})
        return cls(out=first.out, encoder=next((p.encoder for p in parts if p.encoder), ""),
                   device=",".join(devices), precision=next((p.precision for p in parts if p.precision), ""),
                   batch_size=first.batch_size, workers=sum(p.workers for p in parts), compile=first.compile,
                   shard=f"{shard} x {len(parts)} ranks", results=results,
                   seconds=max(p.seconds for p in parts), started=min(p.started for p in parts))

    def save(self, log_dir: Path, tag: str = "") -> Path:
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = log_dir / f"extract-{stamp}-{self.host}-{self.pid}{tag}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def render(self) -> str:
        n = len(self.results)
        lines = []
        if n and self.count("skipped") == n:
            lines.append(f"all {n} slides are already extracted in {self.out}; nothing to do")
        else:
            parts = [f"{self.count('done')} done", f"{self.count('skipped')} already done",
                     f"{self.count('failed')} failed"]
            if self.count("busy"):
                parts.append(f"{self.count('busy')} being extracted by another process")
            lines.append(f"extract: {n} slides: " + ", ".join(parts))
            if self.count("done"):
                ranks = f", {self.shard.split(' x ')[1]}" if " x " in self.shard else ""
                lines.append(f"  {self.tiles:,} tiles in {self.seconds:.1f} s = {self.tiles_per_s:,.1f} tiles/s "
                             f"({self.encoder}, {self.device}, {self.precision}, batch {self.batch_size}, "
                             f"{self.workers} workers{ranks}"
                             + (f", compile {self.compile.split(' (')[0]}" if self.compile != "off" else "")
                             + "".join(f", {n} {k}" for k, n in sorted(self.readers.items())) + ")")
        for r in self.failed:
            lines.append(f"  FAILED [{r.reason}] {r.message}")
        return "\n".join(lines)
