"""Offline kernel report: what ptxas and nvdisasm say about every gpunn kernel (no GPU needed).

    python benchmarks/kernel_report.py [--cc 9.0] [--select REGEX] [--json FILE] [--check] [--jobs N]

1. runs ``python -m gpunn.kernels.ptx`` in a child process without
   ``NUMBA_ENABLE_CUDASIM`` (PTX for every variant, see its index.json),
2. assembles each PTX with ``ptxas -arch=sm_XY -v`` (registers, spills,
   local and shared memory) and counts ``.f64`` instructions in the PTX,
3. disassembles the matrix-product kernels with ``nvdisasm`` and measures
   their main loop: the innermost loop (a backward branch) holding the most
   FFMA (DFMA in float64); per iteration, its FMAs, barriers and the FMA
   share of all its instructions.  Theoretical occupancy comes from the
   registers, shared memory and block size against the target's limits.

ptxas comes from ``nvidia-cuda-nvcc-cu12`` (numba-cuda's ``cu12`` extra) and
nvdisasm from ``nvidia-cuda-nvdisasm``, both in the ``test`` extra, found
with ``cuda.pathfinder``.  ``--check`` exits 1 on any ``.f64`` instruction
in a float32 kernel, any spill or local memory, or a float32 matrix-product
main loop whose FMA share is below ``FMA_SHARE_TARGET``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

#: Lowest acceptable main-loop FMA share of a float32 matrix-product kernel.
FMA_SHARE_TARGET = 0.70
MATRIX_ROLES = ("forward", "backward_data", "backward_weight")

#: Per-SM limits used for theoretical occupancy, by compute capability
#: (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SM_LIMITS = {
    (8, 0): dict(threads=2048, blocks=32, registers=65536, shared=167936, reserved_shared=1024),
    (8, 6): dict(threads=1536, blocks=16, registers=65536, shared=102400, reserved_shared=1024),
    (8, 9): dict(threads=1536, blocks=24, registers=65536, shared=102400, reserved_shared=1024),
    (9, 0): dict(threads=2048, blocks=32, registers=65536, shared=233472, reserved_shared=1024),
}
#: Registers are allocated per warp in units of this many.
REGISTER_UNIT = 256


def tool(name):
    from cuda.pathfinder import find_nvidia_binary_utility

    path = find_nvidia_binary_utility(name)
    if path is None:
        raise SystemExit(f"{name} not found: pip install 'gpunn[test]' (nvidia-cuda-nvcc-cu12, nvidia-cuda-nvdisasm)")
    return path


def write_ptx(out_dir, cc, select, jobs=1):
    """Run the PTX tool in a child process with the simulator switched off."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out_dir = os.path.abspath(out_dir)
    cmd = [sys.executable, "-m", "gpunn.kernels.ptx", "--cc", f"{cc[0]}.{cc[1]}", "--out", out_dir, "--jobs", str(jobs)]
    if select:
        cmd += ["--select", select]
    # run in the output folder: `python -m` puts the working directory first on sys.path, and a
    # source checkout's gpunn/ (without kernels/) would shadow the installed package
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run(cmd, env=env, check=True, cwd=out_dir)
    with open(os.path.join(out_dir, "index.json")) as f:
        return json.load(f)


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_LMEM = re.compile(r"(\d+) bytes lmem")


def assemble(ptx_path, cubin_path, arch):
    """ptxas -v figures: registers, spill bytes, stack/local bytes, static shared bytes."""
    out = subprocess.run(
        [tool("ptxas"), f"-arch={arch}", "-v", ptx_path, "-o", cubin_path], capture_output=True, text=True, check=True
    ).stderr
    registers = int(_PTXAS_USAGE.search(out).group(1))
    stack, spill_st, spill_ld = (int(g) for g in _PTXAS_SPILLS.search(out).groups())
    smem = _PTXAS_SMEM.search(out)
    lmem = _PTXAS_LMEM.search(out)
    return {
        "registers": registers,
        "spill_bytes": spill_st + spill_ld,
        "local_bytes": stack + (int(lmem.group(1)) if lmem else 0),
        "shared_bytes": int(smem.group(1)) if smem else 0,
    }


def f64_count(ptx):
    """PTX instructions touching float64 (the declaration lines have no opcode)."""
    return sum(1 for line in ptx.splitlines() if ".f64" in line and not line.lstrip().startswith((".", "//")))


def occupancy(cc, threads, registers, shared_bytes):
    """Theoretical occupancy: resident warps per SM over the maximum."""
    lim = SM_LIMITS[cc]
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_regs = lim["registers"] // (regs_per_warp * warps) if registers else lim["blocks"]
    by_smem = lim["shared"] // (shared_bytes + lim["reserved_shared"])
    blocks = min(lim["blocks"], lim["threads"] // threads, by_regs, by_smem)
    return blocks * warps / (lim["threads"] // 32)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def parse_sass(text):
    """[(address, instruction text)] and {label: address} from ``nvdisasm -c`` output."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instructions.append((addr, m.group(2)))
    return instructions, labels


def _opcode(ins):
    parts = ins.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def main_loop(sass_text, fma_opcode):
    """Metrics of the innermost loop with the most FMAs: {fma, barriers, instructions, fma_share}."""
    instructions, labels = parse_sass(sass_text)
    loops = []
    for addr, ins in instructions:
        branch = _BRANCH.search(ins)
        if branch and labels.get(branch.group(1), addr + 1) <= addr:
            body = [i for a, i in instructions if labels[branch.group(1)] <= a <= addr]
            fma = sum(1 for i in body if _opcode(i).split(".")[0] == fma_opcode)
            loops.append((fma, -len(body), body))
    if not loops:
        return {"fma": 0, "barriers": 0, "instructions": 0, "fma_share": 0.0}
    fma, _, body = max(loops, key=lambda x: (x[0], x[1]))
    body = [i for i in body if _opcode(i) != "NOP"]
    barriers = sum(1 for i in body if _opcode(i).startswith("BAR"))
    return {"fma": fma, "barriers": barriers, "instructions": len(body), "fma_share": fma / len(body) if body else 0.0}


def analyse(out_dir, index, cc):
    arch = f"sm_{cc[0]}{cc[1]}"
    rows = []
    for entry in index:
        ptx_path = os.path.join(out_dir, entry["file"])
        cubin = ptx_path[:-4] + ".cubin"
        with open(ptx_path) as f:
            ptx = f.read()
        row = dict(entry, **assemble(ptx_path, cubin, arch), f64=f64_count(ptx))
        row["occupancy"] = occupancy(cc, entry["threads_per_block"], row["registers"], row["shared_bytes"])
        if entry["role"] in MATRIX_ROLES:
            sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
            row.update(main_loop(sass, "FFMA" if entry["dtype"] == "float32" else "DFMA"))
        rows.append(row)
    return rows


def failures(rows):
    """Human-readable reasons the report fails its targets (empty when it passes)."""
    bad = []
    for r in rows:
        if r["dtype"] == "float32" and r["f64"]:
            bad.append(f"{r['name']}: {r['f64']} .f64 instructions in a float32 kernel")
        if r["spill_bytes"] or r["local_bytes"]:
            bad.append(f"{r['name']}: {r['spill_bytes']} B spilled, {r['local_bytes']} B local memory")
        if r["dtype"] == "float32" and r["role"] in MATRIX_ROLES and r["fma_share"] < FMA_SHARE_TARGET:
            bad.append(f"{r['name']}: main-loop FMA share {r['fma_share']:.2f} < {FMA_SHARE_TARGET}")
    return bad


def table(rows):
    head = "| kernel | thr | regs | spill B | local B | smem B | occupancy | .f64 | FMA/iter | BAR/iter | instr/iter | FMA share |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        loop = f"{r['fma']} | {r['barriers']} | {r['instructions']} | {r['fma_share']:.2f}" if "fma" in r else "- | - | - | -"
        lines.append(
            f"| {r['name']} | {r['threads_per_block']} | {r['registers']} | {r['spill_bytes']} | {r['local_bytes']} "
            f"| {r['shared_bytes']} | {r['occupancy']:.2f} | {r['f64']} | {loop} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", default="9.0", help="compute capability (default 9.0)")
    parser.add_argument("--select", default=None, help="only variants whose name matches this regular expression")
    parser.add_argument("--out", default=None, help="keep the PTX/cubin here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    args = parser.parse_args(argv)
    cc = tuple(int(p) for p in args.cc.split("."))
    if cc not in SM_LIMITS:
        parser.error(f"--cc: expected one of {', '.join(f'{a}.{b}' for a, b in SM_LIMITS)}, got {args.cc}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or tmp
        index = write_ptx(out_dir, cc, args.select, args.jobs)
        rows = analyse(out_dir, index, cc)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = failures(rows)
    for reason in bad:
        print("FAIL", reason)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
