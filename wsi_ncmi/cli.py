"""The ``wsi-ncmi`` command line.

Every subcommand prints one clear line for a user error (``WsiNcmiError``) and exits 2; a run
where some slides failed exits 1 after listing them; success exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

from wsi_ncmi import __version__
from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.train.config import NCMI_PREDICT_RULES

EXTRACT_EPILOG = """\
examples:
  wsi-ncmi extract slides/ --out features/
  wsi-ncmi extract slides/ --out features/ --encoder uni --mpp 0.5 --patch-size 256
  wsi-ncmi extract slides/ --out features/ --encoder vit_small_patch16_224 --weights vit_s.pth
  wsi-ncmi extract rois/*.png --out features/ --slide-mpp 0.25      # plain images need an mpp
  wsi-ncmi extract slides/ --out features/ --shard 3/10             # job 3 of a 10-job array
  wsi-ncmi extract slides/ --out features2/ --tissue-geojson masks/  # tissue from edited QuPath GeoJSON
  wsi-ncmi extract slides/ --out features/ --remove-pen              # drop green/blue/black ink
  torchrun --nproc-per-node 4 -m wsi_ncmi extract slides/ --out features/   # 4 GPUs, one summary

output (in --out):
  <slide_id>.h5            features (N, D) + coords (N, 2) level-0 px, CLAM/TRIDENT-compatible
  thumbnails/<id>.png      thumbnail with tissue outline and the kept patch grid
  tissue/<id>.geojson      tissue contours in level-0 px (QuPath-importable; edit, then --tissue-geojson)
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
    t.add_argument("--tissue-geojson", metavar="DIR",
                   help="folder of <slide_id>.geojson tissue polygons (level-0 px, e.g. tissue/ exports edited "
                        "in QuPath) used instead of detection; slides without a file are detected")
    t.add_argument("--remove-pen", action="store_true", default=None,
                   help="remove green, blue and black marker ink from the tissue mask (colour rule in README)")
    e = p.add_argument_group("encoder and hardware")
    e.add_argument("--encoder", help="registered name (see `wsi-ncmi encoders`) or any timm model (default resnet50_trunc)")
    e.add_argument("--weights", help="local weights file (.pth/.bin/.safetensors) instead of a download")
    e.add_argument("--encoder-input", choices=["model", "patch"],
                   help="model: resize patches to the encoder's input size (its card; default); patch: feed them "
                        "at --patch-size, CNN encoders only (112 px costs a quarter of 224 px)")
    e.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    e.add_argument("--batch-size", type=int, help="patches per batch (default 256 on GPU, 32 on CPU)")
    e.add_argument("--workers", type=int, help="patch-reading processes (default: cores - 1, at most 16)")
    e.add_argument("--reader", choices=["auto", "openslide"],
                   help="patch reader: auto reads JPEG-tiled TIFF/SVS levels' raw tiles (same pixels as "
                        "OpenSlide, faster; checked per slide) and everything else through OpenSlide (default auto)")
    e.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="inference precision (default auto: the encoder's own on GPU, fp32 on CPU)")
    e.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"],
                   help="torch.compile the encoder (TorchInductor; CNNs also in channels-last memory format). "
                        "auto (default): on on a GPU, off on a CPU. On a CPU, compiling takes 1-1.5 minutes per "
                        "model and process before the first batch (2 cores; less when TorchInductor's cache "
                        "already holds the model). A short run does not earn that back, and on a CPU ViTs run "
                        "at most ~10%% faster (CNNs 1.4-1.5x). Features equal eager ones within float "
                        "tolerance. The file records the setting; it is not part of the settings fingerprint. "
                        "Falls back to eager, with one warning line, where no compiler is available. "
                        "--compile alone = on")
    e.add_argument("--feature-dtype", choices=["float16", "float32"], help="stored dtype (default float16)")
    r = p.add_argument_group("cohort runs")
    r.add_argument("--shard", help="i/N: take every N-th slide starting at i (job arrays)")
    r.add_argument("--lock-stale-after", type=float, help="seconds before another node's silent lock is taken over (default 3600)")
    r.add_argument("--no-thumbnails", dest="thumbnails", action="store_false", default=None,
                   help="skip thumbnail PNGs and GeoJSON")
    r.add_argument("--quiet", "-q", dest="progress", action="store_false", default=None, help="no progress bars")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")


def _cmd_extract(args) -> int:
    from wsi_ncmi.distributed import world
    from wsi_ncmi.extract import ExtractConfig, run_extraction

    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "config", "json")}
    cfg = ExtractConfig.from_sources(args.config, **overrides)
    summary = run_extraction(cfg)
    if world().is_main:                         # under torchrun: one merged summary, from rank 0
        print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return 1 if summary.failed else 0


def _cmd_info(args) -> int:
    from wsi_ncmi.slides.geojson import require_geojson_dir
    from wsi_ncmi.slides.inspect import describe_slide, render_info
    from wsi_ncmi.slides.mpp import load_mpp_csv

    csv_mpp = load_mpp_csv(args.mpp_csv) if args.mpp_csv else None
    require_geojson_dir(args.tissue_geojson)
    infos = [describe_slide(s, args.mpp, args.patch_size, args.min_tissue, csv_mpp, args.slide_mpp,
                            geojson_dir=args.tissue_geojson, remove_pen=args.remove_pen) for s in args.slides]
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


TRAIN_EPILOG = """\
examples:
  wsi-ncmi train --task camelyon17 --labels stage_labels.csv --features features/ --model abmil --loss ncmi --out runs/c17
  wsi-ncmi train --task bracs --slides BRACS_WSI/ --features features/ --loss ce --seeds 5 --out runs/bracs_ce
  wsi-ncmi train --task csv --labels cohort.csv --features features/ --out runs/mine   # slide_id,label[,split|fold,patient]
  wsi-ncmi train --task camelyon17 --labels stage_labels.csv --features features/ --folds 5 --seeds 3 --out runs/c17_cv
  wsi-ncmi train ... --resume          # continue a killed run from its last epoch
  wsi-ncmi train ... --overwrite       # replace the run in --out (another run's settings are refused)

output (in --out): config.yaml, metrics.md / metrics.json (mean +/- std over seeds), and per seed
best.pt/last.pt, history.csv, predictions_<split>.csv, metrics.json (bootstrap CIs), curves.png,
test_confusion_roc.png.

cross-validation (--folds K; default off: the task's single split): folds.csv (slide_id,patient,
label,fold), fold_<k>/ laid out like a run (seed_<s>/..., metrics.json; the fold's own slides are
split "oof"), predictions_oof.csv (every CV-pool slide once per seed), metrics.md / metrics.json
(pooled out-of-fold metrics with bootstrap 95% CIs, mean +/- std over folds x seeds, held-out test).
"""

_TRAIN_FLAGS = [
    ("task", str, "camelyon17, bracs, bracs3 or csv"),
    ("labels", str, "label file: stage_labels.csv, a BRACS CSV, or slide_id,label[,split|fold,patient]"),
    ("slides", str, "BRACS_WSI folder (labels and split from the official layout)"),
    ("features", str, "folder of <slide_id>.h5 (uses features/cohort.zarr when current) or a .zarr"),
    ("out", str, "run folder (default runs/run)"),
    ("model", str, "abmil, clam_sb, clam_mb, transmil, dsmil, acmil, meanpool, maxpool (default abmil)"),
    ("loss", str, "ncmi, ce, weighted_ce, focal, label_smoothing, pc_softmax, mi, cmi_ce, ce+ncmi (default ncmi)"),
    ("seeds", int, "number of seeds to train (default 1)"),
    ("seed", int, "first seed (default 0)"),
    ("epochs", int, "maximum epochs (default 40)"),
    ("lr", str, "AdamW learning rate, or auto: a small grid per loss (1e-4, 3e-4, 1e-3, 3e-3), trained on the first "
                "seed and chosen on validation, recorded in lr_search.json (default 1e-3)"),
    ("weight_decay", float, "AdamW weight decay (default 1e-4)"),
    ("centroid_lr", float, "centroid-step learning rate for ncmi and cmi_ce (default 1e-2)"),
    ("batch_size", int, "bags per step, padded with masks (default 1)"),
    ("max_patches", int, "randomly sub-sample training bags to this many patches (default 0 = all)"),
    ("patch_dropout", float, "drop a random share of each training bag's patches, afresh every epoch, so the "
                             "attention has to find all of a lesion and not its one most telling patch; evaluation "
                             "always sees whole bags (PatchDropout, Liu et al. 2023; default 0 = off). Measured "
                             "at 0.5 on five cohorts: CE +0.03 to +0.13 macro-F1 on all five, NCMI -0.03 to +0.02; "
                             "demo lesion AP 0.63 -> 0.76 (CE), 0.77 -> 0.72 (NCMI) (README: Patch dropout). "
                             "`wsi-ncmi demo` trains with 0.5"),
    ("patience", int, "early-stopping patience in epochs (default 10)"),
    ("min_epochs", int, "early stopping never fires before this many epochs (default 10)"),
    ("select_metric", str, "validation criterion for model selection and early stopping: loss (validation NLL, "
                           "tie-break macro-F1), auc, macro_f1, balanced_accuracy, accuracy (default loss)"),
    ("clip", float, "gradient-norm clipping (default 1.0, 0 = off)"),
    ("dropout", float, "dropout in the aggregator (default 0.25)"),
    ("feature_norm", str, "zscore (default) or none: standardise every feature dimension with the mean and std "
                          "of the training split's instances (one pass over the training bags; the statistics are "
                          "saved in each checkpoint, so evaluate/heatmap/predict apply them); none uses the "
                          "features as extracted. Measured on five cohorts, 5 seeds: zscore raised CE on four and "
                          "left it level on digits, raised NCMI on the four real ones, and raised cmi_ce and "
                          "ce+ncmi on average (3 seeds). On a needle-in-a-haystack cohort a penalty loss can sit "
                          "at chance with it; none is then the fallback (README: Feature standardisation)"),
    ("device", str, "auto, cpu, cuda, cuda:1 (default auto)"),
    ("precision", str, "auto (bf16 on GPU), fp32, bf16, fp16"),
    ("val_fraction", float, "validation fraction where the task draws one: whole patients, stratified (default 0.1)"),
    ("split_seed", int, "seed of that validation draw (default 0)"),
    ("test_fold", int, "for CSVs with a fold column: the test fold (default 0)"),
    ("folds", int, "K-fold cross-validation instead of the single split (default: off, the single split). Folds "
                   "are whole patients, stratified by class, drawn with --split-seed (a CSV fold column gives them "
                   "itself); they cover the slides outside the task's fixed test set (CAMELYON-17 centres 0-2, "
                   "BRACS train+val, a CSV's train+val rows; every slide of a CSV without a split column), and each "
                   "fold draws its own validation from its training part. Each fold is trained into "
                   "<out>/fold_<k>/; the top level reports mean +/- std over folds x seeds, the pooled "
                   "out-of-fold predictions with bootstrap 95%% CIs, and the held-out test where there is one"),
    ("ncmi_space", str, "where NCMI's P lives: embedding (the method's: the penultimate bag embedding; "
                        "default) or logit"),
    ("ncmi_centroids", str, "alternating (default) or fixed centroids"),
    ("ncmi_centre", str, "embedding space: none (default: normalise the bag embedding as it is) or ema (the "
                         "method's: subtract a running mean of the bag embeddings first). Centring at a point "
                         "between the negative and positive bags keeps only which side of it a bag lies on, not "
                         "how much tumour it holds; README, \"NCMI's centre and separation\""),
    ("ncmi_separation", str, "how NCMI's separation combines the divergences KL(Q_k || P) to the rival classes: "
                             "harmonic (default: every rival counts, so two classes cannot merge behind one far "
                             "rival), mean (the method's) or min (the nearest rival); README, \"NCMI's centre and "
                             "separation\""),
    ("ncmi_means", str, "NCMI class means for each epoch's validation: running (the outputs the training pass "
                        "already computed; default) or exact (one more eval pass over the training set, ~1.25x "
                        "the epoch time). With --patch-dropout, exact is used: the training pass sees "
                        "part-bags. The final scores always use the exact pass"),
    ("ncmi_temperature", str, "NSF temperature T, or auto (default): 0.03 in embedding space with "
                              "--feature-norm zscore, where it was measured best, and 0.3 otherwise (logit space "
                              "saturates at 0.03; with --feature-norm none, 0.3 beat 0.1 on five cohorts and "
                              "0.03 on four). README: NCMI temperature"),
    ("ncmi_predict", str, "how an NCMI model predicts a class: nearest (the method's nearest training class mean, "
                          "argmin KL), bayes (argmax of the Bayes score with each class's own spread around its "
                          "mean; the predictions CSV's probabilities pool the spread), or auto (default): per "
                          "model, the one "
                          "with the higher validation macro-F1, nearest on a tie. A trained model's AUC, ECE "
                          "and Brier do not depend on it; its validation macro-F1 can change which epoch is "
                          "kept under --select-metric macro_f1 (and as the tie-break of the default). "
                          "`evaluate --ncmi-predict` re-scores a trained run by another rule (README: NCMI's "
                          "prediction rule)"),
    ("ncmi_weight", float, "weight of the NCMI term in ce+ncmi (default 1.0)"),
    ("mi_weight", float, "mi: weight of the label-entropy term H(Y) (default 1.0)"),
    ("mi_window", int, "mi: training samples in the running marginal, 0 = batch only (default 64)"),
    ("cmi_lambda", float, "cmi_ce: weight of the concentration penalty (default 0.5)"),
    ("cmi_beta", float, "cmi_ce: weight of the separation reward (default 0.1)"),
    ("focal_gamma", float, "focal-loss gamma (default 2)"),
    ("label_smoothing", float, "label-smoothing amount (default 0.1)"),
    ("ram_gb", float, "keep bags in RAM up to this many GB (default 16)"),
    ("bootstrap", int, "bootstrap resamples for test CIs (default 1000)"),
]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train attention-MIL aggregators on feature bags (NCMI or baseline losses)",
                       description="Train an attention-MIL model on extracted features and evaluate it with "
                                   "macro-F1, AUC and balanced accuracy on the task's standard split.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML of train settings (configs/train/*.yaml); flags override it")
    for name, typ, hlp in _TRAIN_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=hlp)
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels")
    p.add_argument("--resume", action="store_true", default=None, help="continue from each seed's last.pt")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run in --out (without it, a run of other settings there is refused)")
    p.add_argument("--allow-missing", action="store_true", default=None,
                   help="train without listed slides that have no features (they are reported)")
    p.add_argument("--allow-patient-overlap", action="store_true", default=None,
                   help="train although the label file puts one patient's slides in two splits (they leak; noted)")
    p.add_argument("--quiet", "-q", dest="progress", action="store_false", default=None, help="no progress bars")
    e = sub.add_parser("evaluate", help="re-score a trained run (writes <run>/evaluate/)")
    e.add_argument("run", help="run folder of `wsi-ncmi train`")
    e.add_argument("--features", help="features to score on (default: the run's own)")
    e.add_argument("--labels", help="label file (default: the run's own; for a moved run or corrected labels)")
    e.add_argument("--slides", help="BRACS_WSI folder (default: the run's own)")
    e.add_argument("--ncmi-predict", choices=NCMI_PREDICT_RULES,
                   help="NCMI runs: re-score by this prediction rule instead of the run's own (see train --help); "
                        "no training needed")
    _add_predict(sub)
    h = sub.add_parser("heatmap", help="attention or information heatmap of a slide under a trained run",
                       description="Draw a trained model's view of one slide over its thumbnail. --kind attention: "
                                   "attention rank per patch. --kind info: attention beside the per-patch pointwise "
                                   "mutual information with a class (infoCAM), estimated from the patch alone "
                                   "(--estimator instance) or from the slide with the patch removed (removal). "
                                   "Writes the PNG, a CSV and a GeoJSON of the per-patch values (QuPath detections "
                                   "with measurements attention and information, level-0 px).",
                       epilog=HEATMAP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("run", help="run folder of `wsi-ncmi train`")
    h.add_argument("slide", help="slide file, or slide id (its path is read from the feature file)")
    h.add_argument("--features", help="extraction folder (default: the run's)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", help="PNG path (default <run>/heatmaps/<slide_id>_seed<seed>[_info].png); "
                                 "per-patch values go to the same name with .csv and .geojson")
    h.add_argument("--kind", choices=("attention", "info"), default="attention", help="what to draw (default attention)")
    h.add_argument("--target-class", dest="target", help="class of the information map (default: the predicted one)")
    h.add_argument("--estimator", choices=("instance", "removal"), default="instance",
                   help="info: log s(c|patch alone) - log prior (default; one pass), or log s(c|slide) - "
                        "log s(c|slide without the patch) (in context; one pass per patch)")
    h.add_argument("--max-evals", type=int, default=2048,
                   help="removal: at most this many removals; larger slides remove blocks of patches (default 2048)")
    _add_overlap_flags(h)
    d = sub.add_parser("demo", help="build a CAMELYON-like demo cohort, extract, train NCMI and CE, report",
                       description="The whole pipeline on a built-in cohort of real-H&E slides with implanted "
                                   "lesions; runs on a CPU in minutes and is resumable.")
    d.add_argument("--out", default="wsi-ncmi-demo", help="demo folder (default wsi-ncmi-demo)")
    d.add_argument("--patients-per-centre", default="10,10,10,4,4", metavar="N[,N,N,N,N]",
                   help="patients in each of the 5 centres (0-2 train and validate, 3-4 test), 5 nodes each; one "
                        "number for all (default 10,10,10,4,4: 190 slides, about 30 training slides per class)")
    d.add_argument("--seeds", type=int, default=3, help="seeds per loss (default 3)")
    d.add_argument("--epochs", type=int, default=40, help="most epochs per seed (default 40; early stopping)")
    d.add_argument("--patch-dropout", type=float, metavar="P",   # default: demo.run.DEMO_PATCH_DROPOUT (a test checks)
                   help="train both losses with `train --patch-dropout P` (default 0.5: the cohort's "
                        "lesions span several patches, where it helps the attention find all of a lesion; why, and "
                        "what it costs NCMI: README, The demo). 0 runs the library defaults into runs/<loss>, "
                        "beside the default runs, on the same slides and features")
    d.add_argument("--verbose", action="store_true", help="show the training log")
    r = sub.add_parser("report", help="one comparison table over several training runs")
    r.add_argument("runs", nargs="+", help="run folders of `wsi-ncmi train`")
    r.add_argument("--out", help="also write the table to this markdown file")
    k = sub.add_parser("pack", help="pack a folder of .h5 features into one zarr cohort cache")
    k.add_argument("features", help="folder of <slide_id>.h5 files")
    k.add_argument("out", nargs="?", help="output .zarr (default <features>/cohort.zarr)")


PREDICT_EPILOG = """\
examples:
  wsi-ncmi predict runs/c17 new_slides/ --out predictions/            # slides: extracted as the run's were
  wsi-ncmi predict runs/c17 features/ --out predictions/              # a features folder of the same settings
  wsi-ncmi predict runs/c17 new_slides/ --out predictions/ --heatmaps --overlap 0.5

output (in --out):
  predictions.csv          slide_id, pred (class name), p_<class> (mean over the run's members),
                           attention_entropy, patches, <member>/p_<class> per seed (fold_<k>/seed_<s>);
                           CAMELYON-17 runs: patient and pN stage (patients with all five nodes)
  features/<slide_id>.h5   features of the slides given, with the run's extraction settings
  heatmaps/<slide_id>.png  with --heatmaps: attention and information, plus .csv and .geojson (QuPath)
  predict.json             run, members, extraction settings, failures with reasons

Slides that cannot be scored (moved, damaged, features of other settings) are listed with the
reason and skipped; the exit status is then 1.
"""

HEATMAP_EPILOG = """\
examples:
  wsi-ncmi heatmap runs/c17 patient_081_node_1                        # attention (PNG + CSV + GeoJSON)
  wsi-ncmi heatmap runs/c17 slides/patient_081_node_1.tif --kind info --overlap 0.75   # finer map
"""


def _add_overlap_flags(p) -> None:
    p.add_argument("--overlap", type=float, default=0.0,
                   help="finer maps: also embed the patch grid shifted by patch*(1-overlap) in x and y, on the fly "
                        "(0.5: 4x the patches, 0.75: 16x; 1 - 1/n only); each pixel averages the patches covering "
                        "it (default 0: the stored grid)")
    p.add_argument("--weights", help="the encoder weights file of the run's features, when they were extracted "
                                     "with --weights (checked against its recorded sha256)")
    p.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, cuda:1 (default auto)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="score new slides (no labels) with every member of a trained run",
                       description="Extract slides with the extraction settings recorded for the run's features "
                                   "(encoder, weights, mpp, patch size, tissue parameters), score each with every "
                                   "trained seed (and fold) of the run and write the ensemble-mean and per-member "
                                   "class probabilities.",
                       epilog=PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder of `wsi-ncmi train`")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slide files, folders of slides, or a features folder / .h5 files of the run's settings")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--heatmaps", action="store_true", help="draw attention and information maps of every slide")
    _add_overlap_flags(p)
    p.add_argument("--quiet", "-q", dest="progress", action="store_false", default=True, help="no progress bars")


def _cmd_predict(args) -> int:
    from wsi_ncmi.predict.runner import run_predict

    res = run_predict(args.run, args.inputs, args.out, args.heatmaps, args.overlap, args.weights, args.device,
                      args.progress)
    print(res.render())
    return 1 if res.failures else 0


def _cmd_train(args) -> int:
    from wsi_ncmi.train.config import TrainConfig
    from wsi_ncmi.train.run import run_training

    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "config")}
    run_training(TrainConfig.from_sources(args.config, **overrides))
    return 0


def _cmd_evaluate(args) -> int:
    from wsi_ncmi.train.run import run_evaluation

    run_evaluation(args.run, args.features, args.labels, args.slides, args.ncmi_predict)
    return 0


def _cmd_heatmap(args) -> int:
    from wsi_ncmi.predict.heatmap import save_heatmap

    png, n, secs = save_heatmap(args.run, args.slide, args.features, args.seed, args.out, args.kind, args.target,
                                args.estimator, args.max_evals, args.overlap, args.weights, args.device)
    print(f"heatmap: {n} patches in {secs:.1f} s -> {png} (+ .csv, .geojson)")
    return 0


def _cmd_demo(args) -> int:
    from wsi_ncmi.demo.run import run_demo

    try:
        counts = [int(v) for v in str(args.patients_per_centre).split(",")]
    except ValueError:
        raise WsiNcmiError(f"--patients-per-centre {args.patients_per_centre}: give one count, or five "
                           "comma-separated counts (one per centre), each 1-20") from None
    if args.seeds < 1 or args.epochs < 1:
        raise WsiNcmiError("--seeds and --epochs must be at least 1")
    given = {} if args.patch_dropout is None else {"patch_dropout": args.patch_dropout}
    run_demo(args.out, counts[0] if len(counts) == 1 else tuple(counts), seeds=args.seeds, epochs=args.epochs,
             verbose=args.verbose, **given)
    return 0


def _cmd_report(args) -> int:
    from wsi_ncmi.train.report import report

    print(report(args.runs, args.out))
    return 0


def _cmd_pack(args) -> int:
    from wsi_ncmi.store.zarr_cache import pack_features

    print(f"packed into {pack_features(args.features, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-ncmi",
        description="Whole-slide image features and attention-MIL training with the NCMI loss.",
        epilog="start with:  wsi-ncmi extract slides/ --out features/   (wsi-ncmi extract --help)")
    parser.add_argument("--version", action="version", version=f"wsi-ncmi {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    _add_extract(sub)
    _add_train(sub)
    i = sub.add_parser("info", help="levels, mpp and whether extraction would succeed, per slide")
    i.add_argument("slides", nargs="+")
    i.add_argument("--mpp", type=float, default=0.5, help="target mpp to check (default 0.5)")
    i.add_argument("--patch-size", type=int, default=256)
    i.add_argument("--min-tissue", type=float, default=0.25)
    i.add_argument("--slide-mpp", type=float)
    i.add_argument("--mpp-csv")
    i.add_argument("--tissue-geojson", metavar="DIR",
                   help="as extract: <slide_id>.geojson tissue polygons replace detection where present")
    i.add_argument("--remove-pen", action="store_true", help="as extract: subtract marker ink from the tissue mask")
    i.add_argument("--json", action="store_true")
    sub.add_parser("encoders", help="list the registered patch encoders")
    return parser


COMMANDS = {"extract": _cmd_extract, "info": _cmd_info, "encoders": _cmd_encoders, "train": _cmd_train,
            "evaluate": _cmd_evaluate, "predict": _cmd_predict, "pack": _cmd_pack, "heatmap": _cmd_heatmap, "demo": _cmd_demo,
            "report": _cmd_report}


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
