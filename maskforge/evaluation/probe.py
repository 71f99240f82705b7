"""Session start time and peak memory of ONNX models, measured in a fresh process (run as a script).

    python probe.py memory MODEL.onnx --shape 1,28,28 --batches 1,64 --threads 2
    python probe.py starts A.onnx B.onnx ... --repeat 3 --threads 2

Each prints one JSON line. `memory`: `baseline_rss_bytes` (the process's resident-set high-water mark
after importing numpy, onnx and onnxruntime and creating and running a one-node session, which sets up
onnxruntime's environment and thread pool), `peak_rss_bytes` (the high-water mark after creating the
model's session and running one batch of each size on random normal inputs) and `model_rss_bytes` (their
difference: what this model costs beyond a trivial one: weights, folded constants, activations and
onnxruntime's arena growth). A high-water mark only grows, so each model needs its own process.
`starts`: `session_start_ms`, for each model the milliseconds of `repeat` session creations, the models
taking turns (round r starts at model r mod n), so that a varying load hits them alike and round r of one
model can be compared with round r of another.

It imports nothing from maskforge (whose package import would load PyTorch and blur the baseline), and is
run by path so that only numpy and onnxruntime are loaded.
"""

import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # this folder's modules (report.py, ...) must not shadow anything


def high_water_bytes() -> int | None:
    """The resident-set high-water mark of this process: VmHWM on Linux, ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux, BSD: KiB


def _warm_up_onnxruntime(ort, options) -> None:
    """Create and run a one-node session, so that the baseline holds onnxruntime's per-process setup."""
    import numpy as np
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    session = _session(ort, model.SerializeToString(), options)
    session.run(None, {"x": np.zeros(1, dtype=np.float32)})
    del session


def _options(ort, threads: int):
    options = ort.SessionOptions()
    options.log_severity_level = 4  # as maskforge's own sessions: fatal only
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _session(ort, model: str, options):
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def memory(model: str, shape: tuple[int, ...], batches: list[int], threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    inputs = [np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32) for b in batches]
    options = _options(ort, threads)
    _warm_up_onnxruntime(ort, options)
    baseline = high_water_bytes()
    session = _session(ort, model, options)
    name = session.get_inputs()[0].name
    for x in inputs:
        session.run(None, {name: x})
    peak = high_water_bytes()
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "model_rss_bytes": peak - baseline if peak is not None and baseline is not None else None,
    }


def starts(models: list[str], repeat: int, threads: int) -> dict:
    import onnxruntime as ort

    options = _options(ort, threads)
    _warm_up_onnxruntime(ort, options)
    times: dict[str, list[float]] = {model: [] for model in models}
    for round_index in range(repeat):
        shift = round_index % len(models)
        for model in models[shift:] + models[:shift]:
            started = time.perf_counter()
            session = _session(ort, model, options)
            times[model].append((time.perf_counter() - started) * 1000.0)
            del session
    return {"session_start_ms": times}


def main(argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    measure_memory = commands.add_parser("memory")
    measure_memory.add_argument("model")
    measure_memory.add_argument("--shape", required=True, help="C,H,W")
    measure_memory.add_argument("--batches", required=True, help="batch sizes, comma-separated")
    measure_starts = commands.add_parser("starts")
    measure_starts.add_argument("models", nargs="+")
    measure_starts.add_argument("--repeat", type=int, default=3)
    for command in (measure_memory, measure_starts):
        command.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "starts":
        return starts(args.models, max(1, args.repeat), args.threads)
    return memory(
        args.model,
        tuple(int(v) for v in args.shape.split(",")),
        [int(v) for v in args.batches.split(",")],
        args.threads,
    )


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
