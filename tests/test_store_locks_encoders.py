import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import yaml

from wsi_ncmi.encoders import create_encoder, get_spec, list_encoders
from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.extract.locks import SlideLock, is_stale
from wsi_ncmi.store import FeatureWriter, read_feature_file
from wsi_ncmi.store.h5 import parse_partial_name

from conftest import ROOT


# ---- HDF5 ------------------------------------------------------------------------------------
def test_writer_is_atomic_and_reader_roundtrips(tmp_path):
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    w = FeatureWriter(tmp_path / "s.h5", tmp_path / ".partial", coords, 4, "float16", {"encoder": "x", "cfg": {"a": 1}})
    w.write(2, np.ones((1, 4), np.float32))
    assert not (tmp_path / "s.h5").exists() and not w.complete   # nothing final until complete
    w.write(0, np.zeros((2, 4), np.float32))
    assert w.complete
    w.commit()
    assert not list((tmp_path / ".partial").iterdir())
    ff = read_feature_file(tmp_path / "s.h5")
    assert ff.features.dtype == np.float16 and ff.features[2].tolist() == [1, 1, 1, 1]
    assert ff.attrs["cfg"] == {"a": 1} and ff.attrs["num_patches"] == 3


def test_writer_refuses_overflow_and_nan(tmp_path):
    w = FeatureWriter(tmp_path / "s.h5", tmp_path / ".p", np.zeros((2, 2)), 2, "float16")
    with pytest.raises(OverflowError, match="float32"):
        w.write(0, np.full((2, 2), 1e6, np.float32))
    with pytest.raises(FloatingPointError):
        w.write(0, np.array([[np.nan, 0], [0, 0]], np.float32))
    w.abort()
    assert not list((tmp_path / ".p").iterdir())


def test_reader_accepts_plain_clam_and_trident_files(tmp_path):
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:
        f["features"] = np.random.rand(5, 8).astype(np.float32)
        f["coords"] = np.arange(10).reshape(5, 2)
    ff = read_feature_file(clam)
    assert ff.features.shape == (5, 8) and ff.coords.shape == (5, 2) and ff.attrs == {}
    batched = tmp_path / "b.h5"
    with h5py.File(batched, "w") as f:
        f["features"] = np.random.rand(1, 5, 8).astype(np.float32)
    assert read_feature_file(batched).features.shape == (5, 8)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["feats"] = np.zeros((2, 2))
    with pytest.raises(WsiNcmiError, match="no 'features' dataset"):
        read_feature_file(bad)
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(WsiNcmiError, match="junk.h5: not a readable HDF5"):
        read_feature_file(tmp_path / "junk.h5")


def test_partial_names_carry_host_and_pid(tmp_path):
    w = FeatureWriter(tmp_path / "a__b.h5", tmp_path / ".p", np.zeros((1, 2)), 2)
    sid, host, pid = parse_partial_name(w.partial_path)
    assert sid == "a__b" and pid == os.getpid()
    w.abort()


# ---- locks -------------------------------------------------------------------------------------
def test_lock_is_exclusive_and_released(tmp_path):
    a, b = SlideLock(tmp_path, "s"), SlideLock(tmp_path, "s")
    assert a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()


def test_lock_of_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    import socket

    (tmp_path / "s.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 0}))
    assert is_stale(tmp_path / "s.lock", 3600)
    assert SlideLock(tmp_path, "s").acquire()


def test_lock_of_other_host_is_stale_only_after_silence(tmp_path):
    p = tmp_path / "s.lock"
    p.write_text(json.dumps({"host": "other-node", "pid": 1, "started": 0}))
    assert not SlideLock(tmp_path, "s", stale_after=600).acquire()
    old = time.time() - 1200
    os.utime(p, (old, old))
    assert SlideLock(tmp_path, "s", stale_after=600).acquire()


# ---- encoders ----------------------------------------------------------------------------------
PUBLISHED_DIMS = {"resnet50_trunc": 1024, "efficientnet_lite0": 1280, "uni": 1024, "uni2_h": 1536,
                  "virchow2": 2560, "h_optimus_0": 1536, "gigapath": 1536,
                  # issue #16: H-optimus-1 and Virchow through timm; Phikon-v2, Hibou-L, Midnight-12k through transformers
                  "h_optimus_1": 1536, "virchow": 2560, "phikon_v2": 1024, "hibou_l": 1024, "midnight_12k": 3072}


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIMS))
def test_registered_architectures_give_published_dims(name):
    """Built on the meta device (no memory, no download): the kwargs reproduce each model card."""
    assert name in list_encoders()
    spec = get_spec(name)
    with torch.device("meta"):
        enc = create_encoder(name, allow_random=True, device="meta")
        x = enc.preprocess(torch.zeros(2, 256, 256, 3, dtype=torch.uint8, device="meta"))
        assert x.shape[-1] == spec.input_size
        assert enc.embed(x).shape == (2, PUBLISHED_DIMS[name]) == (2, spec.dim)


def test_transformers_encoder_runs_and_loads_a_weights_file(tmp_path):
    """The transformers build path on the CPU: output shape/dtype of Hibou-L's layout (4 registers,
    class-token output) at a small width (the full-size architectures are checked on meta above),
    then the same weights saved and loaded back through ``--weights FILE``."""
    from dataclasses import replace

    from wsi_ncmi.encoders.model import Encoder

    small = dict(get_spec("hibou_l").hf_config, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    spec = replace(get_spec("hibou_l"), name="hibou_small", dim=64, hf_config=small)
    enc = Encoder.build(spec, allow_random=True)
    assert enc.trunk.num_prefix_tokens == 5
    x = torch.randint(0, 255, (2, 256, 256, 3), dtype=torch.uint8)
    out = enc(x, "fp32")
    assert out.shape == (2, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.save(enc.trunk.model.state_dict(), tmp_path / "hibou.pth")
    again = Encoder.build(spec, weights=str(tmp_path / "hibou.pth"))
    assert again.weights_id.startswith("file:hibou.pth") and torch.allclose(again(x, "fp32"), out, atol=1e-5)


def test_encoders_command_lists_the_new_encoders():
    from conftest import run_cli

    r = run_cli("encoders")
    assert r.returncode == 0, r.stderr
    for name in ("h_optimus_1", "virchow", "phikon_v2", "hibou_l", "midnight_12k"):
        line = next(l for l in r.stdout.splitlines() if l.startswith(name + " "))
        assert f"dim {PUBLISHED_DIMS[name]}" in line and get_spec(name).precision in line


def test_offline_hub_error_says_how_to_pass_weights():
    with pytest.raises(WsiNcmiError) as e:
        create_encoder("uni")
    msg = str(e.value)
    assert "hf-hub:MahmoodLab/uni" in msg and "--weights FILE" in msg and "huggingface-cli login" in msg


def test_any_timm_model_with_a_weights_file(tmp_path):
    import timm

    src = timm.create_model("resnet18", num_classes=0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "r18.pth")
    enc = create_encoder("resnet18", weights=str(tmp_path / "r18.pth"))
    assert enc.dim == 512 and enc.weights_id.startswith("file:r18.pth sha256:")
    x = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(enc(x), src.eval()(enc.preprocess(x)), atol=1e-5)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WsiNcmiError, match="wrong shape"):
        create_encoder("resnet18", weights=str(tmp_path / "wrong.pth"))
    torch.save({"conv1.weight": src.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(WsiNcmiError, match="missing from the file"):
        create_encoder("resnet18", weights=str(tmp_path / "partial.pth"))
    with pytest.raises(WsiNcmiError, match="unknown encoder 'not_a_model'"):
        create_encoder("not_a_model")


def test_bundled_efficientnet_weights_are_the_imagenet_ones():
    enc = create_encoder("efficientnet_lite0")
    w = enc.trunk.conv_stem.weight
    assert w.shape == (32, 3, 3, 3) and float(w.abs().mean()) > 0.05
    assert enc.weights_id == "file:efficientnet-lite0-57934424.pth sha256:579344248a93e230"


# ---- config ------------------------------------------------------------------------------------
def test_configs_yaml_mirrors_the_defaults():
    data = yaml.safe_load((ROOT / "configs" / "extract.yaml").read_text())["extract"]
    defaults = ExtractConfig().to_dict()
    defaults.pop("slides")
    assert data == defaults


def test_config_file_and_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("extract:\n  encoder: uni\n  mpp: 1.0\n")
    cfg = ExtractConfig.from_sources(str(p), mpp=0.25, patch_size=None)
    assert cfg.encoder == "uni" and cfg.mpp == 0.25 and cfg.patch_size == 256
    p.write_text("extract:\n  encodr: uni\n")
    with pytest.raises(WsiNcmiError, match="unknown extract settings encodr"):
        ExtractConfig.from_sources(str(p))
    with pytest.raises(WsiNcmiError, match="--shard"):
        ExtractConfig(shard="3/2").validate()


# ---- module boundaries -------------------------------------------------------------------------
def _imports(path) -> set:
    import ast

    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_registry_and_device_do_not_pull_in_their_users():
    """encoders/registry.py never imports encoders/model.py, not even lazily (one direction:
    model -> registry), and the trainer takes device resolution from wsi_ncmi.device, not the
    extraction runner."""
    pkg = ROOT / "wsi_ncmi"
    assert "wsi_ncmi.encoders.model" not in _imports(pkg / "encoders" / "registry.py")
    assert "wsi_ncmi.encoders.registry" in _imports(pkg / "encoders" / "model.py")
    for user in ("train/trainer.py", "extract/runner.py"):
        assert "wsi_ncmi.device" in _imports(pkg / user)
    assert "wsi_ncmi.extract.runner" not in _imports(pkg / "train" / "trainer.py")


def test_device_resolution():
    from wsi_ncmi.device import resolve_device, resolve_precision

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", "bf16", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", "bf16", torch.device("cpu")) == "fp16"
    if not torch.cuda.is_available():
        with pytest.raises(WsiNcmiError, match="no CUDA GPU is visible; use --device cpu"):
            resolve_device("cuda:1")
