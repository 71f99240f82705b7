"""Untrusted files cannot run code or reach outside their folder.

* Source scan (AST): the library never imports pickle-like modules except data/cifar.py's restricted CIFAR
  unpickler (which must override `find_class`), never calls `pickle.load(s)`, `torch.load` without
  `weights_only=True`, `np.load(allow_pickle=True)`, `torch.jit.load`, `yaml.load`, `eval` or `exec`.
* A hostile pickle given where an artifact or a checkpoint is expected is refused with a clear error
  and its payload never runs. (The hostile CIFAR pickle is tested in tests/test_data.py.)
* ONNX external data: locations that are absolute, contain `..`, or resolve (through symlinks) outside
  the model's folder are refused by `check_onnx_external_data`, also inside subgraphs and model-local
  functions.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import maskforge
from maskforge.artifact import load_artifact
from maskforge.errors import MaskforgeError
from maskforge.verify import check_onnx_external_data, verify_artifact

PACKAGE_DIR = Path(maskforge.__file__).parent
CLI_DIR = PACKAGE_DIR.parent / "cli"
SOURCES = sorted([*PACKAGE_DIR.rglob("*.py"), *CLI_DIR.rglob("*.py")])
UNPICKLER = PACKAGE_DIR / "data" / "cifar.py"  # the one module allowed to import pickle
PICKLE_LIKE = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


# ---------------------------------------------------------------------------------------------------------
# source scan
# ---------------------------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _scan(source: Path) -> list[str]:
    tree = ast.parse(source.read_text(), str(source))
    problems = []
    for node in ast.walk(tree):
        where = f"{source.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_LIKE and source != UNPICKLER:
                    problems.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_LIKE:
                problems.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads"):
                problems.append(f"{where}: {name}(...)")
            elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
                problems.append(f"{where}: np.load(allow_pickle=True)")
            elif name in (
                "torch.jit.load",
                "yaml.load",
                "yaml.unsafe_load",
                "pd.read_pickle",
                "pandas.read_pickle",
                "torch.package.PackageImporter",
            ):
                problems.append(f"{where}: {name}(...)")
            elif name in ("eval", "exec"):
                problems.append(f"{where}: {name}(...)")
            elif (
                name == "__import__"
                and source.name != "commands.py"
                and not (node.args and isinstance(node.args[0], ast.Constant))
            ):
                # a constant module name is a plain import; commands.py imports its own fixed command modules
                problems.append(f"{where}: __import__ of a computed name")
    return problems


def test_sources_are_found():
    assert {PACKAGE_DIR / "artifact.py", UNPICKLER, PACKAGE_DIR / "schema" / "base.py", CLI_DIR / "app.py"} <= set(
        SOURCES
    )


def test_no_code_executing_loaders_in_the_library():
    problems = [problem for source in SOURCES for problem in _scan(source)]
    assert not problems, problems


def test_the_only_unpickler_is_restricted():
    """data/cifar.py may use pickle only through a subclass of pickle.Unpickler that overrides find_class."""
    tree = ast.parse(UNPICKLER.read_text())
    unpicklers = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(_dotted(base) == "pickle.Unpickler" for base in node.bases)
    ]
    assert unpicklers, "expected data/cifar.py's restricted unpickler"
    for cls in unpicklers:
        methods = {item.name for item in cls.body if isinstance(item, ast.FunctionDef)}
        assert "find_class" in methods, f"{cls.name} must override find_class"
    uses = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle"
    ]
    assert {node.attr for node in uses} <= {"Unpickler", "UnpicklingError", "PickleError"}, {node.attr for node in uses}


def test_the_scanner_catches_what_it_claims(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\nimport numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "pickle.loads(b'')\neval('1')\n"
    )
    found = _scan(bad)
    assert len(found) == 6, found
    assert not _scan(_write(tmp_path / "ok.py", "import torch\ntorch.load('x', weights_only=True)\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# hostile pickles where safetensors files are expected
# ---------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _hostile(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=4))
    return path


def _torch_saved(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"weights": torch.zeros(3), "payload": _Payload(marker)}, path)  # a zip with a pickle inside
    return path


@pytest.mark.parametrize("make", [_hostile, _torch_saved], ids=["raw pickle", "torch.save zip"])
def test_hostile_pickle_as_artifact_is_refused_without_running(tmp_path, make):
    marker = tmp_path / "pwned"
    path = make(tmp_path / "artifact.safetensors", marker)
    with pytest.raises(MaskforgeError, match="not a maskforge artifact"):
        load_artifact(path)
    report = verify_artifact(path)
    assert not report.ok and report.failure.name == "header"
    assert not marker.exists()


def test_hostile_pickle_as_checkpoint_is_refused_without_running(tmp_path):
    checkpoint = pytest.importorskip("maskforge.checkpoint")
    marker = tmp_path / "pwned"
    path = _hostile(tmp_path / "checkpoint.safetensors", marker)
    with pytest.raises(MaskforgeError):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()


def test_hostile_pickle_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from maskforge.cli import app

    marker = tmp_path / "pwned"
    path = _hostile(tmp_path / "model.safetensors", marker)
    commands = [["inspect", str(path)], ["verify", str(path)]]
    names = {info.name for info in app.registered_commands}
    if "export" in names:
        commands.append(["export", str(path), "--out", str(tmp_path / "m.onnx")])
    if "eval" in names:
        commands.append(["eval", str(path)])
    for argv in commands:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2 and result.stderr.startswith("error: "), (argv, result.stderr)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# ONNX external data
# ---------------------------------------------------------------------------------------------------------


def _onnx_with_external(folder: Path, location: str, *, in_subgraph: bool = False) -> Path:
    """A MatMul model whose weight lives in external data at `location` (relative to `folder`)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "W")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    weight.ClearField("raw_data")
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])
    if in_subgraph:
        # the weight hides in a Constant node inside the then-branch of an If
        const = helper.make_node("Constant", [], ["W"], value=weight)
        matmul = helper.make_node("MatMul", ["X", "W"], ["Y_then"])
        then_graph = helper.make_graph(
            [const, matmul], "then", [], [helper.make_tensor_value_info("Y_then", TensorProto.FLOAT, [1, 2])]
        )
        else_graph = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W0"], ["Y_else"])],
            "else",
            [],
            [helper.make_tensor_value_info("Y_else", TensorProto.FLOAT, [1, 2])],
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        w0 = numpy_helper.from_array(np.zeros((4, 2), dtype=np.float32), "W0")
        node = helper.make_node("If", ["cond"], ["Y"], then_branch=then_graph, else_branch=else_graph)
        graph = helper.make_graph([node], "g", [x], [y], initializer=[cond, w0])
    else:
        graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def layout(tmp_path):
    """model/ holds the model and legit data; secret.bin sits outside it; links point out."""
    model_dir = tmp_path / "model"
    (model_dir / "sub").mkdir(parents=True)
    data = np.arange(8, dtype=np.float32).tobytes()
    (model_dir / "weights.bin").write_bytes(data)
    (model_dir / "sub" / "weights.bin").write_bytes(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "secret.bin").write_bytes(data)
    (outside / "weights.bin").write_bytes(data)
    (model_dir / "link.bin").symlink_to(tmp_path / "secret.bin")
    (model_dir / "linkdir").symlink_to(outside, target_is_directory=True)
    return model_dir


@pytest.mark.parametrize("location", ["weights.bin", "sub/weights.bin", "./weights.bin"])
def test_external_data_inside_the_folder_is_accepted(layout, location):
    path = _onnx_with_external(layout, location)
    files = check_onnx_external_data(path)
    assert files == [(layout / location).resolve()]


@pytest.mark.parametrize(
    "location, reason",
    [
        ("../secret.bin", r"climbs out of the model's folder"),
        ("sub/../../secret.bin", r"climbs out of the model's folder"),
        ("..\\secret.bin", r"climbs out of the model's folder"),
        ("/etc/passwd", "absolute path"),
        ("C:\\Windows\\win.ini", "absolute path"),
        ("link.bin", r"outside the model's folder .*symlink"),
        ("linkdir/weights.bin", r"outside the model's folder .*symlink"),
        ("", "empty or invalid"),
    ],
)
def test_external_data_outside_the_folder_is_refused(layout, location, reason):
    path = _onnx_with_external(layout, location)
    with pytest.raises(MaskforgeError, match=reason):
        check_onnx_external_data(path)


def test_external_data_in_a_subgraph_is_checked_too(layout):
    path = _onnx_with_external(layout, "../secret.bin", in_subgraph=True)
    with pytest.raises(MaskforgeError, match="climbs out"):
        check_onnx_external_data(path)
    assert check_onnx_external_data(_onnx_with_external(layout, "weights.bin", in_subgraph=True))


def test_check_accepts_a_model_proto(layout):
    import onnx

    proto = onnx.load(str(_onnx_with_external(layout, "../secret.bin")), load_external_data=False)
    with pytest.raises(MaskforgeError, match="climbs out"):
        check_onnx_external_data(proto, base_dir=layout)


def test_verify_onnx_refuses_traversal_before_loading(layout, tmp_path):
    from maskforge.archs import arch_args, create_model
    from maskforge.artifact import build_artifact, save_artifact
    from maskforge.data import InputSpec
    from maskforge.verify import verify_onnx

    args = arch_args(1, 2, (2, 2))
    artifact = build_artifact(
        create_model("fc", **args, k=0.5, seed=0),
        arch="fc",
        arch_args=args,
        spec=InputSpec(1, 2, 2, (0.5,), (0.5,), ("a", "b")),
        seed=0,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
    )
    artifact_path = save_artifact(artifact, tmp_path / "artifact.safetensors")
    report = verify_onnx(_onnx_with_external(layout, "../secret.bin"), artifact_path)
    assert not report.ok and report.failure.name == "onnx file"
    assert "climbs out" in report.failure.detail


def test_eval_refuses_traversal_with_a_clear_error(layout):
    from typer.testing import CliRunner

    from maskforge.cli import app

    if "eval" not in {info.name for info in app.registered_commands}:
        pytest.skip("`maskforge eval` is not in this checkout")
    result = CliRunner().invoke(app, ["eval", str(_onnx_with_external(layout, "../secret.bin"))])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and "climbs out of the model's folder" in result.stderr


def test_external_data_in_a_model_local_function_is_checked_too(layout):
    """A Constant inside a model-local function (proto.functions) is a tensor like any other (issue 17, 3.7)."""
    import onnx
    from onnx import helper

    plain = onnx.load(str(_onnx_with_external(layout, "../secret.bin")), load_external_data=False)
    weight = onnx.TensorProto()
    weight.CopyFrom(plain.graph.initializer[0])
    const = helper.make_node("Constant", [], ["W"], value=weight)
    matmul = helper.make_node("MatMul", ["X", "W"], ["Y"])
    function = helper.make_function("local", "hidden", ["X"], ["Y"], [const, matmul], [helper.make_opsetid("", 17)])
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("hidden", ["X"], ["Y"], domain="local")], "g", [x], [y])
    model = helper.make_model(
        graph, functions=[function], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )
    path = layout / "function.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(MaskforgeError, match="climbs out"):
        check_onnx_external_data(path)
