"""The README's set-up commands, its Python example, and the CI script that runs its test command."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

SETUP = "python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && "
TRAIN_COMMAND = SETUP + ".venv/bin/gpunn train"
TEST_COMMAND = SETUP + ".venv/bin/pytest -q"


def _sh_blocks():
    return [line.strip() for block in re.findall(r"```sh\n(.*?)```", README, re.S) for line in block.splitlines()]


def test_readme_has_the_two_setup_commands():
    lines = _sh_blocks()
    assert TRAIN_COMMAND in lines
    assert TEST_COMMAND in lines


def test_ci_script_runs_exactly_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    commands = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == TEST_COMMAND
    assert os.access(script, os.X_OK)


def test_readme_keeps_the_sections_others_fill_in():
    for heading in ("## Benchmarks", "## Docker"):
        assert re.search(rf"^{heading}$", README, re.M), heading


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    import gpunn

    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    monkeypatch.chdir(tmp_path)
    gpunn.set_backend("numpy")
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["accuracy"] >= 0.93
    assert (tmp_path / "cancer.gpunn").exists()
    assert namespace["probabilities"].shape == (114, 1)
    capsys.readouterr()


@pytest.mark.parametrize("command", ["train", "predict", "info", "datasets", "bench"])
def test_readme_documents_each_command(command):
    assert f"gpunn {command}" in README
