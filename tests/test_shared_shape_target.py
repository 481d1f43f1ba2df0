"""Reshapes whose target shape comes from ONE shared Concat (torch.onnx's dynamo exporter: every layer's
``view(B, S, kv_heads, head_dim)`` reads the same Concat), and a cut that removes heads in one of them only.

Loading gives each Reshape its own copy of the Concat (``unshare_shape_targets``), so the analysis edits the
target of the cut projection alone: before, the shared entry changed for every Reshape and onnxruntime stopped
at the uncut layer's Reshape (``[64,128,48]`` into ``[64,128,1,24]``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.io.load import unshare_shape_targets
from tests.models import run
from tests.test_groups import _group_of
from tests.test_transformer import _analysis_with, _assert_exact, _zero_groups

DIM, HEADS, HEAD_DIM, TOKENS = 8, 2, 4, 5


def _shared_target_model() -> onnx.ModelProto:
    """x [N, T, 8] → two projections (2 heads x 4) each reshaped to [N, T, 2, 4] by one shared Concat target,
    scaled per head, reshaped back to [N, T, 8] by another shared Concat, projected out and summed."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [weight("w1", DIM, HEADS * HEAD_DIM), weight("w2", DIM, HEADS * HEAD_DIM),
             weight("o1", HEADS * HEAD_DIM, DIM), weight("o2", HEADS * HEAD_DIM, DIM),
             weight("scale1", HEADS, 1), weight("scale2", HEADS, 1),
             numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array([HEADS], np.int64), "heads"),
             numpy_helper.from_array(np.array([HEAD_DIM], np.int64), "head_dim"),
             numpy_helper.from_array(np.array([HEADS * HEAD_DIM], np.int64), "width")]
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "i0"], ["batch"], name="batch", axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["seq"], name="seq", axis=0),
        helper.make_node("Concat", ["batch", "seq", "heads", "head_dim"], ["split_shape"], name="split_concat",
                         axis=0),
        helper.make_node("Concat", ["batch", "seq", "width"], ["merge_shape"], name="merge_concat", axis=0),
    ]
    for k in ("1", "2"):
        nodes += [
            helper.make_node("MatMul", ["input", f"w{k}"], [f"p{k}"], name=f"proj{k}"),
            helper.make_node("Reshape", [f"p{k}", "split_shape"], [f"h{k}"], name=f"split{k}"),
            helper.make_node("Mul", [f"h{k}", f"scale{k}"], [f"s{k}"], name=f"scale{k}"),
            helper.make_node("Relu", [f"s{k}"], [f"r{k}"], name=f"relu{k}"),
            helper.make_node("Reshape", [f"r{k}", "merge_shape"], [f"m{k}"], name=f"merge{k}"),
            helper.make_node("MatMul", [f"m{k}", f"o{k}"], [f"y{k}"], name=f"out{k}"),
        ]
    nodes.append(helper.make_node("Add", ["y1", "y2"], ["y"], name="sum"))
    graph = helper.make_graph(nodes, "shared_target",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", TOKENS, DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", TOKENS, DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_each_reshape_gets_its_own_target_concat() -> None:
    model = _shared_target_model()
    assert unshare_shape_targets(model) == 2
    targets = [n.input[1] for n in model.graph.node if n.op_type == "Reshape"]
    assert len(set(targets)) == 4
    onnx.checker.check_model(model)
    feeds = {"input": np.random.default_rng(1).standard_normal((3, TOKENS, DIM)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, feeds)["y"], run(_shared_target_model(), feeds)["y"])
    assert unshare_shape_targets(model) == 0


@pytest.mark.parametrize("proj", ["proj1", "proj2"])
def test_cutting_one_of_two_reshapes_sharing_a_target_is_exact(proj: str) -> None:
    """Only one projection's group loses channels: its Reshapes change, the other's keep the original target."""
    model = _shared_target_model()
    _, a = _analysis_with(model)
    cut, other = _group_of(a, proj), _group_of(a, "proj2" if proj == "proj1" else "proj1")
    assert cut.id != other.id and cut.prunable and other.prunable
    zeroed, chosen = _zero_groups(model, lambda g: proj in g.producers, ratio=0.5)
    pruned = _assert_exact(zeroed, chosen)
    sizes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert sizes["w1" if proj == "proj1" else "w2"][1] < HEADS * HEAD_DIM
    assert sizes["w2" if proj == "proj1" else "w1"][1] == HEADS * HEAD_DIM


@pytest.mark.slow
def test_dynamo_llama_prunes_to_a_params_target(lm_export: Callable[[str, str], Path],
                                                lm_tokens_npz: Callable[..., Path], tmp_path: Path) -> None:
    """The budget search tries cuts of single layers' KV groups: every candidate must run (issue: Reshape
    ``node_view_4`` got ``[64,128,48]`` for ``[64,128,1,24]``)."""
    from onnxprune.pipeline import prune
    from onnxprune.spec import PruneSpec
    from tests.lms.tokens import heldout_ids, onnx_perplexity

    src = lm_export("llama", "dynamo")
    spec = PruneSpec(target_params=0.7, ratio=0.0, calib=str(lm_tokens_npz("llama", "dynamo", n=64, start=0)),
                     eval_data=str(lm_tokens_npz("llama", "dynamo", n=64, start=64)), metric="perplexity",
                     device="cpu")
    result = prune(src, tmp_path / "pruned.onnx", spec)
    report = result.report
    assert report["pruned"]["params"] <= 0.72 * report["original"]["params"]
    ids = heldout_ids(16, 128, 128)
    ppl = onnx_perplexity(Path(result.output_path), ids)
    assert np.isfinite(ppl) and ppl < 3 * onnx_perplexity(src, ids)
