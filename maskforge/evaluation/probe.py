"""Session start time and peak memory of one ONNX model, measured in a fresh process (run as a script).

    python probe.py MODEL.onnx --shape 1,28,28 --batches 1,64 --threads 2

prints one JSON line: `session_start_ms` (median of 3 session creations), `baseline_rss_bytes` (the
process's resident-set high-water mark after importing numpy, onnx and onnxruntime and creating and
running a one-node session, which sets up onnxruntime's environment and thread pool),
`peak_rss_bytes` (the high-water mark after creating the model's session and running one batch of each
size on random normal inputs) and `model_rss_bytes` (their difference: what this model costs beyond a
trivial one: weights, folded constants, activations and onnxruntime's arena growth).

It imports nothing from maskforge (whose package import would load PyTorch and blur the baseline), and is
run by path so that only numpy and onnxruntime are loaded.
"""

import json
import os
import statistics
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]   # this folder's modules (report.py, ...) must not shadow anything


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
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024   # macOS: bytes; Linux, BSD: KiB


def _warm_up_onnxruntime(ort, options) -> None:
    """Create and run a one-node session, so that the baseline holds onnxruntime's per-process setup."""
    import numpy as np
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, dtype=np.float32)})
    del session


def main(argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--shape", required=True, help="C,H,W")
    parser.add_argument("--batches", required=True, help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    import numpy as np
    import onnxruntime as ort

    shape = tuple(int(v) for v in args.shape.split(","))
    batches = [int(v) for v in args.batches.split(",")]
    inputs = [np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32) for b in batches]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if args.threads:
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
    _warm_up_onnxruntime(ort, options)
    baseline = high_water_bytes()
    starts = []
    for attempt in range(3):
        started = time.perf_counter()
        session = ort.InferenceSession(args.model, sess_options=options, providers=["CPUExecutionProvider"])
        starts.append((time.perf_counter() - started) * 1000.0)
        if attempt == 0:
            name = session.get_inputs()[0].name
            for x in inputs:
                session.run(None, {name: x})
            peak = high_water_bytes()
        del session
    return {"session_start_ms": statistics.median(starts), "session_start_first_ms": starts[0],
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "model_rss_bytes": peak - baseline if peak is not None and baseline is not None else None}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
