"""Three ordinary Keras scripts (tests/keras_scripts/), ported by changing only the import
line, each training to the quality bar it states (and asserts) on scikit-learn's bundled data."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "keras_scripts"


@pytest.mark.parametrize("script", ["breast_cancer", "digits", "diabetes", "wine_functional"])
def test_keras_script_trains_to_its_quality_bar(script, capsys):
    path = SCRIPTS / f"{script}.py"
    source = path.read_text()
    # only import lines name gpunn: the rest is written against Keras's API
    naming = [line for line in source.splitlines() if "gpunn" in line and not line.lstrip().startswith(('"""', "#"))]
    assert naming and all(re.match(r"^(import gpunn as keras|from gpunn import [\w, ]+)$", line) for line in naming), naming
    runpy.run_path(str(path), run_name="__main__")  # each script asserts its own bar
    assert "test " in capsys.readouterr().out
