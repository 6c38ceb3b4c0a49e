"""The Dockerfiles: every path they copy exists and every extra they install is defined.

No Docker engine runs in CI, so the files are checked statically: the build
context is the repository root (``docker build -f docker/Dockerfile .``).
"""

import os
import re
import shlex
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def _instructions(path):
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    with open(os.path.join(REPO, path), encoding="utf-8") as fh:
        lines = [line for line in fh.read().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _copy_sources(args):
    if args.startswith("["):
        import json

        parts = json.loads(args)
    else:
        parts = shlex.split(args)
    parts = [p for p in parts if not p.startswith("--")]  # --chown=..., --from=... handled below
    return parts[:-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copied_path_exists(dockerfile):
    copies = [args for word, args in _instructions(dockerfile) if word in ("COPY", "ADD")]
    assert copies, "the image must copy the sources in"
    for args in copies:
        assert "--from" not in args, "multi-stage copies are not expected here"
        for src in _copy_sources(args):
            assert os.path.exists(os.path.join(REPO, src)), f"{dockerfile}: COPY source {src!r} does not exist"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_installed_extra_is_defined(dockerfile):
    extras_defined = set(_pyproject()["project"].get("optional-dependencies", {}))
    runs = [args for word, args in _instructions(dockerfile) if word == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "the image must pip install gpunn"
    for extra_list in re.findall(r"\.\[([^\]]*)\]", " ".join(installs)):
        for extra in extra_list.split(","):
            assert extra.strip() in extras_defined, f"{dockerfile}: extra {extra!r} is not in pyproject's optional-dependencies"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_is_the_gpunn_command(dockerfile):
    entry = [args for word, args in _instructions(dockerfile) if word == "ENTRYPOINT"]
    assert entry and entry[-1] in ('["gpunn"]', "gpunn")
    assert "gpunn" in _pyproject()["project"]["scripts"]


def test_gpu_image_is_cuda12_and_installs_the_cuda12_extra():
    instructions = _instructions("docker/Dockerfile")
    base = next(args for word, args in instructions if word == "FROM")
    assert re.match(r"nvidia/cuda:12\.[\d.]+-(runtime|devel)", base), base
    assert any(re.search(r"\.\[([^\]]*,)?cuda12(,[^\]]*)?\]", args) for word, args in instructions if word == "RUN")


def test_every_package_directory_is_copied():
    """What setuptools packages (package-dir) must be in the image, or `pip install .` fails."""
    tool = _pyproject()["tool"]["setuptools"]
    dirs = {tool.get("package-dir", {}).get(pkg, pkg.replace(".", "/")) for pkg in tool["packages"]}
    readme = _pyproject()["project"].get("readme")
    for dockerfile in DOCKERFILES:
        copied = set()
        for word, args in _instructions(dockerfile):
            if word in ("COPY", "ADD"):
                copied.update(s.rstrip("/") for s in _copy_sources(args))
        for d in dirs:
            assert any(d == c or d.startswith(c + "/") for c in copied), f"{dockerfile} does not copy {d}"
        if readme:
            assert readme in copied, f"{dockerfile} does not copy {readme} (pyproject's readme)"
