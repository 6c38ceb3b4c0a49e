"""gpunn's CPU ``predict`` against ONNX Runtime (and PyTorch) on the same float32 model.

The inference target (issue 12): ``predict`` on 100k rows of a 7-layer
float32 MLP runs at least as fast as ONNX Runtime on the same graph with the
same thread count.  The ONNX graph is built by hand (``onnx.helper``:
MatMul + Add + activation per layer, Softmax last) from the gpunn model's
weights, so both run the very same numbers; the script first checks that
their outputs agree.  Contenders run interleaved (A, B, C, A, ...), each
figure is the fastest of several windows, and throughputs are reported as
ratios against ONNX Runtime measured in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_inference_vs_onnx.py

Needs ``onnx`` and ``onnxruntime`` (``pip install onnx onnxruntime``);
PyTorch is optional.  Exit status 2 when ONNX Runtime is missing, else 0
whatever the numbers (it measures; it does not judge).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HIDDEN = (512, 512, 256, 256, 128, 64)  # 7 Dense layers with the 10-way output


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--features", type=int, default=784)
    p.add_argument("--hidden", default=",".join(map(str, HIDDEN)), help="comma-separated widths of the 6 hidden layers")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--batch-sizes", default="32,1024", help="gpunn predict batch_size values to time")
    p.add_argument("--windows", type=int, default=7, help="timed windows per contender; the fastest counts")
    return p.parse_args()


def build_model(features, hidden=HIDDEN):
    import gpunn

    gpunn.set_seed(0)
    layers = [gpunn.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(gpunn.layers.Dense(10, activation="softmax"))
    model = gpunn.Sequential([gpunn.Input(shape=(features,)), *layers], dtype="float32")
    model.build()
    return model


def onnx_graph(weights, features):
    """The model as an ONNX graph: MatMul, Add, Relu per hidden layer; MatMul, Add, Softmax last."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, name = [], [], "x"
    for i in range(0, len(weights), 2):
        kernel, bias = weights[i], weights[i + 1]
        inits += [numpy_helper.from_array(kernel, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        last = i + 2 == len(weights)
        op, attrs = ("Softmax", {"axis": -1}) if last else ("Relu", {})
        name = "y" if last else f"h{i}"
        nodes.append(helper.make_node(op, [f"a{i}"], [name], **attrs))
    graph = helper.make_graph(
        nodes,
        "gpunn_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def torch_model(weights):
    import torch

    mods = []
    for i in range(0, len(weights), 2):
        lin = torch.nn.Linear(*weights[i].shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(weights[i].T.copy()))
            lin.bias.copy_(torch.from_numpy(weights[i + 1]))
        mods += [lin, torch.nn.ReLU() if i + 2 < len(weights) else torch.nn.Softmax(dim=1)]
    return torch.nn.Sequential(*mods).eval()


def main() -> int:
    args = _parse()
    try:
        import onnxruntime as ort
    except ImportError:
        print("cpu_inference_vs_onnx: onnxruntime is not installed (pip install onnx onnxruntime)")
        return 2
    try:
        import torch
    except ImportError:
        torch = None
    from threadpoolctl import threadpool_limits

    from gpunn.bench.machine import cpu_name, usable_cores

    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = build_model(args.features, hidden)
    weights = model.get_weights()
    graph = onnx_graph(weights, args.features)
    x = np.random.default_rng(0).random((args.rows, args.features), dtype=np.float32)
    flops = 2 * sum(w.size for w in weights[::2]) * args.rows
    print(f"CPU: {cpu_name()}, usable cores {usable_cores()}; load average {os.getloadavg()}")
    print(f"onnxruntime {ort.__version__}; torch {torch.__version__ if torch else 'absent'}; "
          f"model {args.features}-{'-'.join(map(str, hidden))}-10 float32, {args.rows:,} rows, {flops / 1e9:.2f} GFLOP")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        contenders = {"onnxruntime": lambda: session.run(None, {"x": x})[0]}
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            contenders[f"gpunn batch_size={bs}"] = lambda bs=bs: model.predict(x, batch_size=bs, verbose=0)
        if torch is not None:
            tm, tx = torch_model(weights), torch.from_numpy(x)

            def run_torch():
                with torch.inference_mode():
                    return tm(tx).numpy()

            contenders["torch"] = run_torch
        with threadpool_limits(limits=threads):
            if torch is not None:
                torch.set_num_threads(threads)
            ref = contenders["onnxruntime"]()
            for name, fn in contenders.items():  # warm-up and same answers
                err = float(np.max(np.abs(fn() - ref)))
                print(f"  threads {threads} {name}: max |out - onnxruntime| = {err:.1e}")
            best = dict.fromkeys(contenders, np.inf)
            names = list(contenders)
            for w in range(args.windows):
                for name in names[w % len(names):] + names[: w % len(names)]:
                    t0 = time.perf_counter()
                    contenders[name]()
                    best[name] = min(best[name], time.perf_counter() - t0)
        for name in names:
            rows.append((threads, name, best[name], best["onnxruntime"] / best[name]))
    print(f"\nload average after: {os.getloadavg()}")
    print(f"{'threads':>7}  {'contender':<24} {'ms':>9} {'rows/s':>12} {'GFLOP/s':>8} {'vs ORT':>7}")
    for threads, name, t, ratio in rows:
        print(f"{threads:7d}  {name:<24} {t * 1e3:9.1f} {args.rows / t:12,.0f} {flops / t / 1e9:8.1f} {ratio:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
