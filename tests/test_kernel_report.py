"""The offline kernel report: PTX for sm_90 from `python -m gpunn.kernels.ptx`, ptxas and nvdisasm.

No GPU or driver is needed (the toolchain comes from the ``test`` extra's
wheels), so this runs in CI.  The tools run as child processes without
``NUMBA_ENABLE_CUDASIM``, which conftest.py switches on for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys

import pytest

from gpunn import codes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(REPO, "benchmarks", "kernel_report.py")
MATRIX_ROLES = {"forward", "backward_data", "backward_weight"}
FMA_SHARE_TARGET = 0.70

#: What CI compiles: float32 ReLU forward (bias) and gradient (db) kernels of
#: both tiles; the gradient kernels that multiply dy by the derivative the
#: forward stored in z (the backward of codes.ACT_KEEPS_Z -- GELU, swish,
#: mish, softplus, ELU, SELU, relu6, hard_sigmoid -- and of every activation
#: under dropout), float32 both tiles and float64 64x64
#: (where GELU's backward once spilled), and float64 ReLU 64x64; forward
#: kernels with the heaviest epilogues (GELU storing its derivative, mish
#: with the Philox dropout mask: the epilogue must not push the register
#: tile to local memory); and the heaviest elementwise, loss and optimizer
#: kernels (Adam also reading its scalars from the step record) and the
#: offset gather.  All activations share one main loop per (dtype, tile, role);
#: `benchmarks/kernel_report.py` run by hand covers all ~610 variants (tens
#: of minutes on 2 cores).
CI_SELECTION = (
    r"^linear_forward-f32-relu-.*-bias$"
    r"|^linear_backward_.*-f32-(relu|stored)-.*(-db|x64|x128)$"
    r"|^linear_backward_.*-f64-(relu|stored)-64x64-f64(-db)?$"
    r"|^linear_forward-f32-gelu-128x128-bias$|^linear_forward-f32-mish-64x64-bias-dropout$"
    r"|^activation-f32-mish$"
    r"|^loss-f32-softmax_cce-weighted-grad$"
    r"|^optimizer-f32-(adam|rmsprop|adam-record)$|^gather-f32$"
    r"|^fill-f32$"
)


def _without_simulator():
    return {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}


def _ptx_tool(*args, env=None):
    # run outside the checkout: `python -m` puts the working directory first on sys.path, and the
    # checkout's gpunn/ (without kernels/) would shadow the installed package
    return subprocess.run(
        [sys.executable, "-m", "gpunn.kernels.ptx", "--cc", "9.0", *args],
        env=_without_simulator() if env is None else env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )


def test_ptx_tool_enumerates_every_code_from_gpunn_codes():
    run = _ptx_tool("--list")
    assert run.returncode == 0, run.stderr
    names = set(run.stdout.split())
    for tag in ("f32", "f64"):
        for act in codes.Act:
            key = f"-{tag}-{act.name.lower()}-"
            assert any(n.startswith("linear_forward") and key in n and n.endswith("-dropout") for n in names), act
            for role in ("linear_forward", "linear_backward_data", "linear_backward_weight"):
                # backward of ACT_KEEPS_Z activations is the shared kernel multiplying by the stored z
                wanted = f"-{tag}-stored-" if role != "linear_forward" and act.keeps_z else key
                assert any(n.startswith(role) and wanted in n for n in names), (role, tag, act.name)
            assert f"activation-{tag}-{act.name.lower()}" in names
        for kind in codes.LossKind:
            assert any(n.startswith(f"loss-{tag}-{kind.name.lower()}-") for n in names), kind.name
        for opt in codes.Opt:
            assert f"optimizer-{tag}-{opt.name.lower()}" in names


def test_ptx_tool_refuses_the_simulator(tmp_path):
    run = _ptx_tool("--out", str(tmp_path), env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert run.returncode != 0 and "NUMBA_ENABLE_CUDASIM" in run.stderr


def test_kernel_report_meets_its_targets(tmp_path):
    out = tmp_path / "report.json"
    ptx_dir = tmp_path / "ptx"
    run = subprocess.run(
        [sys.executable, REPORT, "--select", CI_SELECTION, "--json", str(out), "--out", str(ptx_dir), "--check", "--jobs", "2"],
        env=_without_simulator(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    with open(out) as f:
        rows = json.load(f)
    # the PTX tool's own output: one file per index entry, for sm_90
    with open(ptx_dir / "index.json") as f:
        index = json.load(f)
    assert [e["name"] for e in index] == [r["name"] for r in rows]
    assert set(index[0]) == {"name", "file", "role", "dtype", "threads_per_block"}
    for entry in index:
        ptx = (ptx_dir / entry["file"]).read_text()
        assert ".target sm_90" in ptx and ".entry" in ptx
    forward = next(e for e in index if e["name"] == "linear_forward-f32-relu-64x64-bias")
    assert {"linear_backward_data-f32-stored-128x128", "linear_forward-f32-mish-64x64-bias-dropout"} <= {e["name"] for e in index}
    assert forward["role"] == "forward" and forward["dtype"] == "float32" and forward["threads_per_block"] == 64
    assert {r["role"] for r in rows} >= MATRIX_ROLES | {"activation", "loss", "optimizer"}
    for r in rows:
        assert r["spill_bytes"] == 0 and r["local_bytes"] == 0, r
        assert r["registers"] > 0 and 0 < r["occupancy"] <= 1, r
        if r["dtype"] == "float32":
            assert r["f64"] == 0, r
        if r["role"] in MATRIX_ROLES:
            # one barrier per slice, the 8x8 (float32) or 4x4 (float64) tile unrolled over the slice
            assert r["barriers"] == 1 and r["fma"] >= 128, r
            if r["dtype"] == "float32":
                assert r["fma_share"] >= FMA_SHARE_TARGET, r


@pytest.mark.parametrize(
    "sass,expected",
    [
        # a loop of 3 instructions (2 FFMA) nested in one of 6; the inner one is the main loop
        (
            """
.L_x_0:
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_1:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/                   FFMA R5, R3, R4, R5 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
""",
            {"fma": 2, "barriers": 0, "instructions": 3},
        ),
        ("        /*0000*/                   EXIT ;\n", {"fma": 0, "barriers": 0, "instructions": 0}),
    ],
)
def test_main_loop_parser(sass, expected):
    sys.path.insert(0, os.path.dirname(REPORT))
    try:
        import kernel_report
    finally:
        sys.path.pop(0)
    got = kernel_report.main_loop(sass, "FFMA")
    assert {k: got[k] for k in expected} == expected
