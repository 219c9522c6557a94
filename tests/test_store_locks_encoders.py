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
                  "h_optimus_1": 1536, "virchow": 2560, "phikon_v2": 1024, "hibou_l": 1024, "midnight_12k": 3072,
                  # CONCH v1.5 (TITAN's patch encoder): ViT-L/16 at 448 px + attentional pooler
                  "conch_v15": 768}


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
    for name in ("h_optimus_1", "virchow", "phikon_v2", "hibou_l", "midnight_12k", "conch_v15"):
        line = next(l for l in r.stdout.splitlines() if l.startswith(name + " "))
        assert f"dim {PUBLISHED_DIMS[name]}" in line and get_spec(name).precision in line


def _small_conch_spec():
    """CONCH v1.5's layout at a small width: a 4 x 4 patch grid at 64 px, the reference grid 2 x 2 (32 px)."""
    from dataclasses import replace

    small = dict(get_spec("conch_v15").arch_kwargs, img_size=64, embed_dim=64, depth=2, num_heads=4,
                 out_dim=32, pool_heads=4, base_img_size=32)
    return replace(get_spec("conch_v15"), name="conch_small", dim=32, arch_kwargs=small, input_size=64,
                   resize_to=64)


def _reference_conch(tower, x, pe_base):
    """CONCH v1.5's published computation, written out independently: the 2 x 2 reference grid of position
    embeddings interpolated at every forward (bicubic, DINO's +0.1 scale), then the attentional pooler as
    softmax(q k^T / sqrt(d) - max) v over all tokens, then LayerNorm."""
    import torch.nn.functional as F

    t = tower.trunk
    tok = t.patch_embed(x)
    tok = torch.cat([t.cls_token.expand(len(x), -1, -1), tok], dim=1)
    c = pe_base.shape[-1]
    grid = pe_base[:, 1:].reshape(1, 2, 2, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(4.1 / 2, 4.1 / 2), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, c)
    tok = t.norm(t.blocks(tok + torch.cat([pe_base[:, :1], grid], dim=1)))
    p = tower.attn_pool_contrast
    h = p.heads
    q = p.to_q(p.ln_q(p.query))[None].expand(len(x), -1, -1)
    k, v = p.to_kv(p.ln_k(tok)).chunk(2, dim=-1)
    q, k, v = (z.reshape(z.shape[0], z.shape[1], h, -1).transpose(1, 2) for z in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    att = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", att, v).transpose(1, 2).reshape(len(x), 1, -1)
    return tower.ln_contrast(p.to_out(out)[:, 0])


def test_conch_v15_runs_loads_its_checkpoint_layout_and_matches_the_reference(tmp_path):
    """CONCH v1.5 on the CPU at a small width: output shape/dtype; a checkpoint in the released layout
    (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``, position embeddings on the 224 px grid)
    loads through ``--weights FILE`` and gives the reference computation's embeddings."""
    from wsi_ncmi.encoders.model import Encoder

    spec = _small_conch_spec()
    enc = Encoder.build(spec, allow_random=True)
    x = torch.randint(0, 255, (3, 96, 96, 3), dtype=torch.uint8)
    out = enc(x, "fp32")
    assert out.shape == (3, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    sd = {k: v.clone() for k, v in enc.trunk.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    pe_base = torch.randn(1, 1 + 4, 64, generator=g)          # reference grid 2 x 2
    sd["trunk.pos_embed"] = pe_base
    torch.save(sd, tmp_path / "pytorch_model_vision.bin")
    loaded = Encoder.build(spec, weights=str(tmp_path / "pytorch_model_vision.bin"))
    assert loaded.weights_id.startswith("file:pytorch_model_vision.bin sha256:")
    assert loaded.trunk.trunk.pos_embed.shape == (1, 1 + 16, 64)
    with torch.inference_mode():
        ref = _reference_conch(loaded.trunk, loaded.preprocess(x), pe_base)
    assert torch.allclose(loaded(x, "fp32"), ref, atol=1e-5), (loaded(x, "fp32") - ref).abs().max()
    # a file saved from this module (already at 448 px here: 4 x 4) loads unchanged
    torch.save(loaded.trunk.state_dict(), tmp_path / "again.pth")
    again = Encoder.build(spec, weights=str(tmp_path / "again.pth"))
    assert torch.equal(again.trunk.trunk.pos_embed, loaded.trunk.trunk.pos_embed)


def test_offline_hub_error_says_how_to_pass_weights():
    with pytest.raises(WsiNcmiError) as e:
        create_encoder("uni")
    msg = str(e.value)
    assert "hf-hub:MahmoodLab/uni" in msg and "--weights FILE" in msg and "huggingface-cli login" in msg
    with pytest.raises(WsiNcmiError) as e:
        create_encoder("conch_v15")
    msg = str(e.value)
    assert "MahmoodLab/conchv1_5" in msg and "pytorch_model_vision.bin" in msg and "--weights FILE" in msg


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


# ---- torch.compile -------------------------------------------------------------------------------
def test_compile_falls_back_to_eager_with_one_warning_line(monkeypatch, capsys):
    """A backend failure on the first batch (here: a stand-in for inductor without its compiler) and a
    missing C++ compiler both leave the same encoder running eager, with one line on stderr."""
    from wsi_ncmi.encoders import model as model_mod

    enc = create_encoder("resnet10t", allow_random=True)
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    eager = enc(x)

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("C++ compile error\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(model_mod, "_compile_blocker", lambda device: None)   # as if a compiler were found
    assert enc.use_compile() == "inductor+channels_last"
    out = enc(x)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed (RuntimeError: C++ compile error)" in err[0]
    assert enc.compile_state.startswith("eager+channels_last") and torch.allclose(out, eager, atol=1e-4)
    enc(x)
    assert capsys.readouterr().err == ""          # warned once

    monkeypatch.undo()
    monkeypatch.setattr(model_mod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    vit = _tiny_vit()
    assert vit.use_compile().startswith("eager (no C++ compiler found")
    assert "no C++ compiler found" in capsys.readouterr().err
    assert vit(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 32)


def _tiny_vit():
    from dataclasses import replace

    from wsi_ncmi.encoders.model import Encoder

    spec = replace(get_spec("vit_tiny_patch16_224"), arch_kwargs=dict(img_size=32, embed_dim=32, depth=1,
                                                                      num_heads=2), input_size=32, dim=32)
    return Encoder.build(spec, allow_random=True)


def test_compiled_extraction_gives_the_eager_features(tmp_path):
    """``--compile on`` on this CPU (TorchInductor, a small CNN in channels-last): the same features as
    eager within float tolerance, on a slide whose patch count is no multiple of the batch (the last
    batch is padded to the compiled one); the file records the option, which is no part of its settings."""
    from conftest import make_tissue_slide

    from wsi_ncmi.extract import run_extraction

    slide = make_tissue_slide(tmp_path / "s.tiff", 0.5, [(100, 100, 700, 560)], width_um=1000, height_um=800)
    weights = tmp_path / "r10.pth"
    torch.save(create_encoder("resnet10t", allow_random=True).trunk.state_dict(), weights)
    feats, attrs = {}, {}
    for mode in ("off", "on"):
        cfg = ExtractConfig(slides=[str(slide)], out=str(tmp_path / mode), encoder="resnet10t", weights=str(weights),
                            device="cpu", workers=0, batch_size=8, patch_size=64, mpp=2.0, min_tissue=0.0,
                            feature_dtype="float32", thumbnails=False, progress=False, compile=mode)
        summary = run_extraction(cfg)
        assert summary.count("done") == 1, summary.render()
        ff = read_feature_file(tmp_path / mode / "s.h5")
        feats[mode], attrs[mode] = ff.features, ff.attrs
    assert len(feats["on"]) % 8 != 0
    from wsi_ncmi.encoders.model import _compile_blocker

    # where this machine has no C++ compiler, the run falls back to eager and says so
    want = "inductor+channels_last" if _compile_blocker(torch.device("cpu")) is None else "eager+channels_last ("
    assert attrs["off"]["compile"] == "off" and attrs["on"]["compile"].startswith(want)
    assert attrs["on"]["settings_fingerprint"] == attrs["off"]["settings_fingerprint"]
    scale = np.abs(feats["off"]).max()
    np.testing.assert_allclose(feats["on"], feats["off"], rtol=0, atol=1e-4 * max(1.0, scale))


def test_encoder_input_patch_embeds_the_patch_as_cut(tmp_path):
    """``--encoder-input patch``: a CNN embeds each patch at --patch-size, not resized to its card's
    224 px; the file's settings record it, so predict re-extracts the same way; a ViT is refused."""
    from conftest import make_tissue_slide

    from wsi_ncmi.extract import run_extraction
    from wsi_ncmi.predict.settings import build_encoder, extract_config
    from wsi_ncmi.store.provenance import file_provenance

    weights = tmp_path / "r10.pth"
    torch.save(create_encoder("resnet10t", allow_random=True).trunk.state_dict(), weights)
    enc = create_encoder("resnet10t", str(weights))
    x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    resized = enc(x)
    enc.use_patch_input()
    as_cut = enc.embed((x.permute(0, 3, 1, 2).float() / 255 - enc.mean) / enc.std)
    torch.testing.assert_close(enc(x), as_cut)
    assert (enc(x) - resized).abs().max() > 1e-3          # the resize changed what the CNN saw

    slide = make_tissue_slide(tmp_path / "s.tiff", 0.5, [(100, 100, 700, 560)], width_um=1000, height_um=800)
    feats = {}
    for mode in ("model", "patch"):
        cfg = ExtractConfig(slides=[str(slide)], out=str(tmp_path / mode), encoder="resnet10t", weights=str(weights),
                            device="cpu", workers=0, patch_size=64, mpp=2.0, min_tissue=0.0, encoder_input=mode,
                            feature_dtype="float32", thumbnails=False, progress=False)
        assert run_extraction(cfg).count("done") == 1
        feats[mode] = read_feature_file(tmp_path / mode / "s.h5")
        prov = file_provenance(tmp_path / mode / "s.h5")
        assert prov["settings"]["encoder_input"] == mode
        again = extract_config(prov, [], tmp_path, weights=str(weights))     # how predict re-extracts
        assert again.encoder_input == mode and build_encoder(again, prov).patch_input == (mode == "patch")
    assert np.array_equal(feats["model"].coords, feats["patch"].coords)
    assert np.abs(feats["model"].features - feats["patch"].features).max() > 1e-3
    with pytest.raises(WsiNcmiError, match="not a plain CNN"):
        _tiny_vit().use_patch_input()
    with pytest.raises(WsiNcmiError, match="--encoder-input"):
        ExtractConfig(encoder_input="native").validate()


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
    p.write_text("extract:\n  compile: off\n")           # YAML's off is a boolean
    assert ExtractConfig.from_sources(str(p)).compile == "off"
    cfg = ExtractConfig.from_sources(None, compile=None)
    assert cfg.compile == "auto" and cfg.compile_on("cuda") and not cfg.compile_on("cpu")
    with pytest.raises(WsiNcmiError, match="--compile"):
        ExtractConfig(compile="max").validate()


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
