"""``--metric perplexity``: next-token perplexity of LM logits on the data's own ``input_ids``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune import cli
from onnxprune.errors import BadInputError
from onnxprune.measure.metrics import TaskMetric, perplexity
from onnxprune.spec import parse_metric
from tests.lms.tokens import feeds_for, heldout_ids, torch_perplexity

# A bigram "LM": logits[t] = TABLE[input_ids[t]], so perplexity is computable by hand.
TABLE = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32))


def _bigram_model(input_name: str = "input_ids") -> onnx.ModelProto:
    """``input_ids [N, T]`` -> ``hidden`` (first output, not the logits) and ``logits [N, T, 3]``."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", input_name], ["logits"]),
         helper.make_node("Identity", [input_name], ["hidden"])],
        "bigram", [helper.make_tensor_value_info(input_name, onnx.TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("hidden", onnx.TensorProto.INT64, ["N", "T"]),
         helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", "T", 3])],
        [numpy_helper.from_array(TABLE, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_perplexity_by_hand() -> None:
    ids = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    logits = TABLE[ids]
    # row 0: p(1|0) p(1|1) p(2|1) = .25 .8 .1; row 1: p(2|2) p(0|2) p(0|0) = .6 .2 .5
    probs = [0.25, 0.8, 0.1, 0.6, 0.2, 0.5]
    assert perplexity(logits, ids) == pytest.approx(math.exp(-np.mean(np.log(probs))), rel=1e-6)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])  # drops p(2|1) (target padded) and p(2|2) (source padded)
    kept = [0.25, 0.8, 0.2, 0.5]
    assert perplexity(logits, ids, mask) == pytest.approx(math.exp(-np.mean(np.log(kept))), rel=1e-6)


def test_task_metric_reads_logits_and_reports_perplexity() -> None:
    ids = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    task = TaskMetric.create(_bigram_model(), lambda: iter([{"input_ids": ids}]), parse_metric("perplexity"),
                             has_labels=False, device="cpu")
    expected = math.exp(-np.mean(np.log([0.25, 0.8, 0.1, 0.6, 0.2, 0.5])))
    assert task.label == "negative_log_perplexity"
    assert task.baseline.compared == 6
    assert task.shown is not None and task.shown.convert(task.baseline.value) == pytest.approx(expected, rel=1e-6)


def test_report_gives_perplexity_beside_its_log() -> None:
    from onnxprune.report import _metric_lines, metric_report

    section = metric_report("negative_log_perplexity", "perplexity", "tokens.npz", -math.log(20.0), -math.log(25.0),
                            [("cut", -math.log(30.0))], shown=("perplexity", lambda v: math.exp(-v)))
    assert section["drop_points"] == pytest.approx(100 * math.log(25 / 20), abs=1e-5)
    shown = section["shown"]
    assert (shown["original"], shown["pruned"], shown["ratio"]) == pytest.approx((20.0, 25.0, 1.25))
    assert shown["stages"][0]["value"] == pytest.approx(30.0)
    assert _metric_lines(section)[1] == "  perplexity: original 20, pruned 25 (1.250x); after cut 30"
    assert "shown" not in metric_report("accuracy", "top1", "d", 0.9, 0.8, [])


def test_perplexity_refuses_data_without_input_ids() -> None:
    batches = lambda: iter([{"tokens": np.array([[0, 1, 2]])}])
    with pytest.raises(BadInputError, match="input_ids"):
        TaskMetric.create(_bigram_model("tokens"), batches, parse_metric("perplexity"), has_labels=False, device="cpu")


def test_perplexity_refuses_ids_outside_the_vocabulary() -> None:
    with pytest.raises(BadInputError, match="vocabulary"):
        perplexity(TABLE[np.array([[0, 1]])], np.array([[0, 7]]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("style", ["plain", "cache"])
def test_onnx_perplexity_matches_torch(kind: str, style: str, lm_export: Callable[[str, str], Path]) -> None:
    from tests.lms.exports import trained

    path = lm_export(kind, style)
    ids = heldout_ids(12, 96)
    feeds = feeds_for(path, ids)
    task = TaskMetric.create(path, lambda: iter([{k: v[:6] for k, v in feeds.items()},
                                                 {k: v[6:] for k, v in feeds.items()}]),
                             parse_metric("perplexity"), has_labels=False, device="cpu")
    assert task.shown is not None
    onnx_ppl = task.shown.convert(task.baseline.value)
    assert onnx_ppl == pytest.approx(torch_perplexity(trained(kind), ids), rel=1e-4)
    assert onnx_ppl < 60  # trained: the unigram baseline is ~208


@pytest.mark.slow  # ~8 s: a whole prune run
def test_cli_reports_perplexity_of_original_and_pruned(lm_export: Callable[[str, str], Path],
                                                       lm_tokens_npz: Callable[..., Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from tests.lms.exports import trained

    model, data = lm_export("llama", "plain"), lm_tokens_npz("llama", "plain", n=8, seq=64)
    report = tmp_path / "report.json"
    assert cli.main(["prune", str(model), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.2",
                     "--eval-data", str(data), "--metric", "perplexity", "--report", str(report)]) == 0
    metric = json.loads(report.read_text())["metric"]
    shown = metric["shown"]
    assert metric["name"] == "perplexity" and shown["label"] == "perplexity"
    assert shown["original"] == pytest.approx(torch_perplexity(trained("llama"), heldout_ids(8, 64)), rel=1e-4)
    assert shown["original"] == pytest.approx(math.exp(-metric["original"]), rel=1e-9)
    assert math.isfinite(shown["pruned"]) and shown["ratio"] == pytest.approx(shown["pruned"] / shown["original"])
    assert metric["drop_points"] == pytest.approx(100 * math.log(shown["ratio"]), abs=1e-4)
    assert "perplexity: original" in capsys.readouterr().out
