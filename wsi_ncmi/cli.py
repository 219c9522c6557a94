"""The ``wsi-ncmi`` command line.

Every subcommand prints one clear line for a user error (``WsiNcmiError``) and exits 2; a run
where some slides failed exits 1 after listing them; success exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from wsi_ncmi import __version__
from wsi_ncmi.errors import WsiNcmiError

EXTRACT_EPILOG = """\
examples:
  wsi-ncmi extract slides/ --out features/
  wsi-ncmi extract slides/ --out features/ --encoder uni --mpp 0.5 --patch-size 256
  wsi-ncmi extract slides/ --out features/ --encoder vit_small_patch16_224 --weights vit_s.pth
  wsi-ncmi extract rois/*.png --out features/ --slide-mpp 0.25      # plain images need an mpp
  wsi-ncmi extract slides/ --out features/ --shard 3/10             # job 3 of a 10-job array

output (in --out):
  <slide_id>.h5            features (N, D) + coords (N, 2) level-0 px, CLAM/TRIDENT-compatible
  thumbnails/<id>.png      thumbnail with tissue outline and the kept patch grid
  tissue/<id>.geojson      tissue contours in level-0 px (QuPath-importable)
  logs/extract-*.json      run summary: counts, failures with reasons, tiles/s

Rerunning the same command only does the slides that are not finished. Several processes or
nodes may share one --out folder: lock files keep each slide to one of them.
"""


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="tissue detection, tiling and patch embeddings -> one HDF5 per slide",
                       description="Find tissue, tile it into patches of an exact physical size and embed "
                                   "every patch with a pretrained encoder; one HDF5 file per slide.",
                       epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="+", help="slide files and/or folders (searched recursively)")
    p.add_argument("--out", "-o", help="output folder (default: features)")
    p.add_argument("--config", help="YAML file of extract settings (flags override it)")
    g = p.add_argument_group("patches")
    g.add_argument("--mpp", type=float, help="target microns per pixel of the patches (default 0.5, '20x')")
    g.add_argument("--patch-size", type=int, help="patch side in px at --mpp (default 256)")
    g.add_argument("--min-tissue", type=float, help="keep patches at least this fraction tissue (default 0.25)")
    g.add_argument("--slide-mpp", type=float, help="level-0 mpp for slides whose metadata has none")
    g.add_argument("--mpp-csv", help="CSV slide_id,mpp: per-slide mpp, used before slide metadata")
    t = p.add_argument_group("tissue detection")
    t.add_argument("--tissue-mpp", type=float, help="resolution of the tissue mask in um/px (default 8)")
    t.add_argument("--min-saturation", type=int, help="lowest saturation threshold, 0-255 (default 15)")
    t.add_argument("--max-saturation", type=int, help="highest saturation threshold, 0-255 (default 45)")
    t.add_argument("--min-region-um2", type=float, help="drop tissue pieces smaller than this (default 20000)")
    t.add_argument("--max-hole-um2", type=float, help="fill holes smaller than this (default 20000)")
    e = p.add_argument_group("encoder and hardware")
    e.add_argument("--encoder", help="registered name (see `wsi-ncmi encoders`) or any timm model (default resnet50_trunc)")
    e.add_argument("--weights", help="local weights file (.pth/.bin/.safetensors) instead of a download")
    e.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    e.add_argument("--batch-size", type=int, help="patches per batch (default 256 on GPU, 32 on CPU)")
    e.add_argument("--workers", type=int, help="patch-reading processes (default: cores - 1, at most 16)")
    e.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="inference precision (default auto: the encoder's own on GPU, fp32 on CPU)")
    e.add_argument("--feature-dtype", choices=["float16", "float32"], help="stored dtype (default float16)")
    r = p.add_argument_group("cohort runs")
    r.add_argument("--shard", help="i/N: take every N-th slide starting at i (job arrays)")
    r.add_argument("--lock-stale-after", type=float, help="seconds before another node's silent lock is taken over (default 3600)")
    r.add_argument("--no-thumbnails", dest="thumbnails", action="store_false", default=None,
                   help="skip thumbnail PNGs and GeoJSON")
    r.add_argument("--quiet", "-q", dest="progress", action="store_false", default=None, help="no progress bars")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")


def _cmd_extract(args) -> int:
    from wsi_ncmi.extract import ExtractConfig, run_extraction

    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "config", "json")}
    cfg = ExtractConfig.from_sources(args.config, **overrides)
    summary = run_extraction(cfg)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return 1 if summary.failed else 0


def _cmd_info(args) -> int:
    from wsi_ncmi.slides.inspect import describe_slide, render_info
    from wsi_ncmi.slides.mpp import load_mpp_csv

    csv_mpp = load_mpp_csv(args.mpp_csv) if args.mpp_csv else None
    infos = [describe_slide(s, args.mpp, args.patch_size, args.min_tissue, csv_mpp, args.slide_mpp) for s in args.slides]
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n".join(render_info(i) for i in infos))
    return 0 if all(i["ok"] for i in infos) else 1


def _cmd_encoders(args) -> int:
    from wsi_ncmi.encoders import get_spec, list_encoders

    for name in list_encoders():
        s = get_spec(name)
        src = "bundled (offline)" if s.local_weights else (s.hub or "")
        print(f"{name:<20} dim {s.dim:<5} {s.precision:<5} {src}{'  [gated]' if s.gated else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-ncmi",
        description="Whole-slide image features and attention-MIL training with the NCMI loss.",
        epilog="start with:  wsi-ncmi extract slides/ --out features/   (wsi-ncmi extract --help)")
    parser.add_argument("--version", action="version", version=f"wsi-ncmi {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    _add_extract(sub)
    i = sub.add_parser("info", help="levels, mpp and whether extraction would succeed, per slide")
    i.add_argument("slides", nargs="+")
    i.add_argument("--mpp", type=float, default=0.5, help="target mpp to check (default 0.5)")
    i.add_argument("--patch-size", type=int, default=256)
    i.add_argument("--min-tissue", type=float, default=0.25)
    i.add_argument("--slide-mpp", type=float)
    i.add_argument("--mpp-csv")
    i.add_argument("--json", action="store_true")
    sub.add_parser("encoders", help="list the registered patch encoders")
    return parser


COMMANDS = {"extract": _cmd_extract, "info": _cmd_info, "encoders": _cmd_encoders}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.cmd](args)
    except WsiNcmiError as exc:
        print(f"wsi-ncmi {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wsi-ncmi {args.cmd}: interrupted; finished slides are saved, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
