"""Verification of models with onnxruntime contrib ops: onnx.checker skips the ops it has no schema for, still
fails standard ops, and onnxruntime's load and run is the check for the contrib ones (stated in the report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError, InvariantError, is_internal
from onnxprune.io.export import export_checked
from onnxprune.io.shapes import UNCHECKED_DOMAIN, check_model, ops_without_schema
from onnxprune.pipeline import prune
from onnxprune.runtime import session as session_module
from onnxprune.spec import PruneSpec
from tests.models import run
from tests.test_cli import cli

CONTRIB_OPS = ["SimplifiedLayerNormalization", "com.microsoft.BiasGelu", "com.microsoft.SkipLayerNormalization"]


def build_contrib_mlp(seed: int = 0, *, time_dim: str | int = 3) -> onnx.ModelProto:
    """fc1 → Relu → fc2 (a prunable MLP), then onnxruntime contrib ops before fc3.

    ``com.microsoft`` SkipLayerNormalization and BiasGelu, and SimplifiedLayerNormalization, which onnxruntime
    registers in the default domain (the genai builder's RMSNorm) and onnx.checker rejects outright.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [init("w1", 8, 16), init("b1", 16), init("w2", 16, 8), init("beta", 8), init("gelu_bias", 8),
             init("w3", 8, 4), numpy_helper.from_array((1 + rng.standard_normal(8) * 0.1).astype(np.float32), "gamma")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="act"),
        helper.make_node("MatMul", ["h", "w2"], ["z"], name="fc2"),
        helper.make_node("SkipLayerNormalization", ["z", "x", "gamma", "beta"], ["s"], name="skip_ln",
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("SimplifiedLayerNormalization", ["s", "gamma"], ["n"], name="rms_norm", axis=-1,
                         epsilon=1e-5),
        helper.make_node("BiasGelu", ["n", "gelu_bias"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(nodes, "contrib_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", time_dim, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", time_dim, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _feeds(batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 8)).astype(np.float32)}


def test_onnxruntime_runs_the_model_and_a_bare_checker_refuses_it() -> None:
    """The premise: a valid model (onnxruntime runs it) that plain onnx.checker rejects."""
    model = build_contrib_mlp()
    assert run(model, _feeds())["y"].shape == (2, 3, 4)
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for SimplifiedLayerNormalization"):
        onnx.checker.check_model(model, full_check=True)


def test_check_model_skips_only_ops_onnx_has_no_schema_for() -> None:
    model = build_contrib_mlp()
    before = model.SerializeToString()
    assert check_model(model) == CONTRIB_OPS
    assert check_model(model, full_check=False) == CONTRIB_OPS
    assert ops_without_schema(model) == CONTRIB_OPS
    assert model.SerializeToString() == before  # the checker's copy was edited, never the model
    assert UNCHECKED_DOMAIN not in {o.domain for o in model.opset_import}


def test_check_model_knows_an_op_by_the_models_opset() -> None:
    """LayerNormalization is standard from opset 17; below it, it is onnxruntime's contrib op of the same name."""
    def layer_norm(opset: int) -> onnx.ModelProto:
        node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)
        graph = helper.make_graph([node], "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                                  [numpy_helper.from_array(np.ones(8, np.float32), "g"),
                                   numpy_helper.from_array(np.zeros(8, np.float32), "b")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)

    assert check_model(layer_norm(17)) == []
    assert check_model(layer_norm(14)) == ["LayerNormalization"]
    assert run(layer_norm(14), {"x": np.ones((2, 8), np.float32)})["y"].shape == (2, 8)


def _break(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    node = next(n for n in broken.graph.node if n.name == {"attribute": "act", "shape": "fc2", "input": "fc3",
                                                           "domain": "gelu"}[how])
    if how == "attribute":
        node.attribute.append(helper.make_attribute("alpha", 0.1))  # Relu has no alpha
    elif how == "shape":
        node.input[1] = "w1"  # [N, 3, 16] x [8, 16]: inner dims differ
    elif how == "input":
        node.input[0] = "nowhere"  # a standard op reading a tensor nothing produces
    else:
        node.domain = "com.example"  # a domain the model does not import
    return broken


@pytest.mark.parametrize(("how", "error", "fragment"), [
    ("attribute", onnx.checker.ValidationError, "Unrecognized attribute: alpha for operator Relu"),
    ("shape", onnx.shape_inference.InferenceError, "MatMul"),
    ("input", onnx.checker.ValidationError, "nowhere"),
    ("domain", onnx.checker.ValidationError, "com.example"),
])
def test_check_model_still_fails_real_errors_beside_contrib_ops(how: str, error: type[Exception],
                                                                fragment: str) -> None:
    broken = _break(build_contrib_mlp(), how)
    with pytest.raises(error, match=fragment):
        check_model(broken)
    with pytest.raises(InvariantError, match="fails onnx.checker"):
        export_checked(broken)


def test_prune_with_contrib_ops_verifies_through_onnxruntime(tmp_path: Path) -> None:
    path, out, report_path = tmp_path / "contrib.onnx", tmp_path / "small.onnx", tmp_path / "r.json"
    model = build_contrib_mlp()
    onnx.save(model, path)
    analysis = cli("analyze", str(path))
    assert analysis.returncode == 0, analysis.stderr
    assert "blocked: SkipLayerNormalization at node skip_ln not understood" in analysis.stdout

    proc = cli("prune", str(path), "-o", str(out), "--ratio", "0.3", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["fidelity"]["samples"] > 0
    [note] = [n for n in report["notes"] if n.startswith("verification via onnxruntime")]
    assert ", ".join(CONTRIB_OPS) in note and "onnxruntime loaded and ran the pruned model" in note
    assert report["pruned"]["params"] < report["original"]["params"]

    pruned = onnx.load(out)
    assert [n.domain for n in pruned.graph.node] == [n.domain for n in model.graph.node]  # never our marker domain
    assert {o.domain for o in pruned.opset_import} == {"", "com.microsoft"}
    w1 = next(t for t in pruned.graph.initializer if t.name == "w1")
    assert w1.dims[1] < 16
    assert run(pruned, _feeds())["y"].shape == (2, 3, 4)


def test_no_contrib_note_for_standard_models(tmp_path: Path) -> None:
    path = tmp_path / "contrib.onnx"
    model = build_contrib_mlp()
    del model.graph.node[4:7]  # the three contrib nodes, replaced by a standard Relu
    model.graph.node.insert(4, helper.make_node("Relu", ["z"], ["g"], name="relu2"))
    assert ops_without_schema(model) == []
    onnx.save(model, path)
    report = prune(path, tmp_path / "o.onnx", PruneSpec(ratio=0.3, device="cpu")).report
    assert not [n for n in report["notes"] if "verification via onnxruntime" in n]


def test_without_inputs_onnxruntime_still_loads_the_pruned_model(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A symbolic dim without --shape: nothing to run, but onnxruntime's load checks the contrib ops."""
    path = tmp_path / "contrib.onnx"
    onnx.save(build_contrib_mlp(time_dim="T"), path)
    report = prune(path, tmp_path / "o.onnx", PruneSpec(ratio=0.3, device="cpu")).report
    assert report["fidelity"] is None
    assert any(n.startswith("fidelity not measured") for n in report["notes"])
    [note] = [n for n in report["notes"] if n.startswith("verification via onnxruntime")]
    assert "loaded the pruned model (not run: no inputs to draw)" in note

    def refuse_pruned(model: object, *args: object, **kwargs: object) -> session_module.Session:
        raise BadInputError("onnxruntime cannot load the model: (simulated)", field="model")

    monkeypatch.setattr(session_module, "make_session", refuse_pruned)
    with pytest.raises(InvariantError, match="cannot load the pruned model") as info:
        prune(path, tmp_path / "o2.onnx", PruneSpec(ratio=0.3, device="cpu"))
    assert is_internal(info.value)
    assert not (tmp_path / "o2.onnx").exists()
