"""Raw-tile fast path on the accelerator: decode JPEG tiles there and cut the patches there.

With a GPU the workers only read compressed tile bytes (``pack_batch``); the main process decodes
them in one batched ``torchvision.io.decode_jpeg(..., device="cuda")`` call (nvjpeg), assembles
each run's region on the device and cuts the patches there (``decode_and_cut``): no decoded pixel
crosses PCIe and no CPU core decodes. The cutting is the CPU path's, in torch:

* regions are assembled and sub-pixel shifted exactly as ``rawjpeg`` does (same functions);
* direct patches are the same slices;
* resampled patches use PIL's own bilinear coefficients (``pil_taps``: ``Image.resize(box=...)``'s
  ``precompute_coeffs`` and its 22-bit fixed-point weights, horizontal pass then vertical, each
  rounded to uint8), computed in float64 where those integer sums are exact; so they equal PIL's.

The same code runs with CPU tensors (torchvision's CPU ``decode_jpeg``), which is how the tests
check it against OpenSlide on machines without a GPU. Before trusting a device decoder for a
slide, ``DeviceCutter`` compares its decode of the first tile with libjpeg-turbo's; when they
differ by more than ``DEVICE_TOLERANCE`` that slide's tiles are decoded on the CPU instead.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from wsi_ncmi.slides.rawjpeg import RawJpegLevel, paste_tiles, round_u8, shift_subpixel, subpixel_offset

PRECISION_BITS = 32 - 8 - 2   # Pillow's Resample.c for 8-bit images
DEVICE_TOLERANCE = 4          # grey levels between a device decoder and libjpeg-turbo on the same tile


def pil_taps(in_size: int, box0: float, box1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear ``precompute_coeffs`` for one axis: (xmin (out,), fixed-point weights (out, K))."""
    scale = (box1 - box0) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xmins = np.zeros(out_size, np.int64)
    kk = np.zeros((out_size, ksize), np.float64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = box0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        x = np.arange(xmax)
        w = np.clip(1.0 - np.abs((x + xmin - center + 0.5) * ss), 0.0, None)
        ww = w.sum()
        if ww != 0.0:
            w = w / ww
        kk[xx, :xmax] = w
        xmins[xx] = xmin
    fixed = np.where(kk < 0, np.trunc(-0.5 + kk * (1 << PRECISION_BITS)), np.trunc(0.5 + kk * (1 << PRECISION_BITS)))
    return xmins, fixed


def _dense(xmins: np.ndarray, fixed: np.ndarray, start: int, width: int) -> np.ndarray:
    """(out, width) weights over input columns ``[start, start + width)``."""
    out = np.zeros((len(xmins), width), np.float64)
    k = fixed.shape[1]
    for i, xm in enumerate(xmins):
        a = xm - start
        n = min(k, width - a)
        out[i, a:a + n] = fixed[i, :n]
    return out


def _fixed_round(s: torch.Tensor) -> torch.Tensor:
    half = float(1 << (PRECISION_BITS - 1))
    return torch.clamp(torch.floor((s + half) / float(1 << PRECISION_BITS)), 0, 255)


def cut_run(region: torch.Tensor, oxs: np.ndarray, oy: float, w: float, h: float, size: int,
            direct: bool) -> torch.Tensor:
    """Patches of one run from its (H, W, 3) uint8 region tensor, as ``PatchReader._read_run`` cuts them."""
    if direct:
        ry = int(round(oy))
        return torch.stack([region[ry:ry + size, int(round(ox)):int(round(ox)) + size] for ox in oxs])
    H, W = region.shape[:2]
    ymins, yfix = pil_taps(H, oy, oy + h, size)
    y0 = int(ymins.min())
    ky = int((ymins + yfix.shape[1]).max()) - y0
    ky = min(ky, H - y0)
    wy = torch.from_numpy(_dense(ymins, yfix, y0, ky)).to(region.device)
    rows = region[y0:y0 + ky].to(torch.float64)                          # (ky, W, 3)
    kx = int(math.ceil(w)) + 4
    starts, wxs = [], []
    for ox in oxs:
        xmins, xfix = pil_taps(W, float(ox), float(ox) + w, size)
        s = int(xmins.min())
        starts.append(s)
        wxs.append(_dense(xmins, xfix, s, kx))
    wx = torch.from_numpy(np.stack(wxs)).to(region.device)                # (n, size, kx)
    pad = torch.zeros((ky, kx, 3), dtype=rows.dtype, device=rows.device)
    rows = torch.cat([rows, pad], dim=1)                                  # windows may run past the edge (weight 0)
    idx = torch.as_tensor(np.asarray(starts)[:, None] + np.arange(kx)[None, :], device=region.device)
    win = rows[:, idx]                                                    # (ky, n, kx, 3)
    horiz = _fixed_round(torch.einsum("ynxc,npx->nypc", win, wx))          # (n, ky, size, 3)
    out = _fixed_round(torch.einsum("qy,nypc->nqpc", wy, horiz))           # (n, size, size, 3)
    return out.to(torch.uint8)


def pack_batch(reader, coords: np.ndarray) -> dict:
    """Worker side: the compressed tiles and run geometry of one batch (no decoding).

    ``reader`` is a ``PatchReader`` with a ``RawJpegReader``; the tiles are complete JPEG streams
    (``RawJpegLevel.standalone_stream``) as uint8 tensors, each tile once per batch.
    """
    from wsi_ncmi.slides.rawjpeg import tiles_in

    raw = reader.raw
    lv = raw.level
    coords = np.asarray(coords, np.int64)
    runs, ids = [], {}
    for i, j in reader.runs(coords):
        ix0, iy0, w, h, oxs, oy = reader.run_box(coords[i:j])
        _, dx, dy = subpixel_offset(ix0, iy0, reader.ds)
        m = 0 if dx == 0.0 and dy == 0.0 else 1
        for idx, _, _ in tiles_in(lv, ix0 - m, iy0 - m, w + 2 * m, h + 2 * m):
            ids.setdefault(idx, len(ids))
        runs.append((i, j, ix0, iy0, w, h, dx, dy, oxs, oy))
    streams = [torch.frombuffer(bytearray(lv.standalone_stream(raw.raw_tile(t))), dtype=torch.uint8) for t in ids]
    return {"jpeg": streams, "tile_ids": list(ids), "runs": runs, "n": len(coords), "size": reader.size,
            "w": reader.w, "h": reader.h, "direct": reader.direct, "bg": tuple(int(v) for v in reader.bg),
            "level": replace(lv, offsets=(), counts=(), tables=None)}


class DeviceCutter:
    """Main-process side: decode a packed batch on ``device`` and cut its patches there."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cpu_decode: dict[int, bool] = {}   # slide key -> device decoder rejected for it

    def _decode(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        import warnings

        with warnings.catch_warnings():   # torchvision 0.29 flags its image codecs as deprecated (TorchCodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            out = decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)
        return [t.permute(1, 2, 0) for t in out]

    @staticmethod
    def _decode_cpu(streams: list[torch.Tensor], device) -> list[torch.Tensor]:
        import imagecodecs

        return [torch.from_numpy(imagecodecs.jpeg8_decode(s.numpy())).to(device) for s in streams]

    def _device_ok(self, key: int, streams: list[torch.Tensor]) -> bool:
        if key not in self.cpu_decode:
            try:
                ours = self._decode(streams[:1])[0].cpu().to(torch.int16)
            except Exception:             # the device decoder cannot read this slide's tiles: decode on the CPU
                self.cpu_decode[key] = True
                return False
            ref = self._decode_cpu(streams[:1], "cpu")[0].to(torch.int16)
            self.cpu_decode[key] = ours.shape != ref.shape or int((ours - ref).abs().max()) > DEVICE_TOLERANCE
        return not self.cpu_decode[key]

    def __call__(self, key: int, batch: dict) -> torch.Tensor:
        streams = batch["jpeg"]
        if not streams:
            tiles = {}
        elif self._device_ok(key, streams):
            tiles = dict(zip(batch["tile_ids"], self._decode(streams)))
        else:
            tiles = dict(zip(batch["tile_ids"], self._decode_cpu(streams, self.device)))
        lv: RawJpegLevel = batch["level"]
        size = batch["size"]
        out = torch.empty((batch["n"], size, size, 3), dtype=torch.uint8, device=self.device)
        bg = torch.tensor(batch["bg"], dtype=torch.uint8, device=self.device)
        for i, j, ix0, iy0, w, h, dx, dy, oxs, oy in batch["runs"]:
            m = 0 if dx == 0.0 and dy == 0.0 else 1
            region = bg.expand(h + 2 * m, w + 2 * m, 3).clone()
            paste_tiles(region, tiles.__getitem__, lv, ix0 - m, iy0 - m)
            if m:
                region = round_u8(shift_subpixel(region, dx, dy))
            out[i:j] = cut_run(region, oxs, oy, batch["w"], batch["h"], size, batch["direct"])
        return out
