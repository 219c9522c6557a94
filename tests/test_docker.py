"""The GPU image, checked without a Docker engine: lint, and the same install as the package's."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())           # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_image_installs_the_package_with_the_ci_pins():
    ins = _instructions()
    base = next(v for op, v in ins if op == "ARG" and v.startswith("BASE_IMAGE="))
    torch_in_base = re.match(r"BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime$", base)
    assert torch_in_base, f"base must be an official pytorch/pytorch CUDA runtime tag, not {base}"
    assert torch_in_base.group(1) == _pins()["torch"], "base image torch differs from constraints.txt"
    runs = [v for op, v in ins if op == "RUN" and "pip install" in v]
    assert len(runs) == 1 and re.search(r"pip install --no-cache-dir -c constraints\.txt \.(\s|$)", runs[0])
    copied = [w for op, v in ins if op == "COPY" for w in v.split()[:-1]]
    for src in copied:
        assert (ROOT / src).exists(), src
    assert {"pyproject.toml", "constraints.txt", "wsi_ncmi"} <= set(copied)
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert all(f"!{c.rstrip('/')}" in {i.rstrip("/") for i in ignore} for c in copied)   # in the build context


def test_image_runs_the_cli_as_a_non_root_user_with_volumes():
    ins = dict((op, v) for op, v in _instructions())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert ins["ENTRYPOINT"] == '["wsi-ncmi"]' and "wsi-ncmi" in project["scripts"]
    assert ins["USER"].split(":")[0] not in ("0", "root")
    assert all(v in ins["VOLUME"] for v in ('"/slides"', '"/out"'))


def test_every_dependency_is_pinned_inside_its_declared_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for r in reqs:
        name = r.name.lower().replace("_", "-")
        assert name in pins, f"{r.name} has no pin in constraints.txt"
        assert r.specifier.contains(pins[name]), f"{r.name}=={pins[name]} is outside {r.specifier}"
