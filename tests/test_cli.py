"""The ``onnxprune`` command as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.errors import BadInputError, InvariantError, PlanError, SurgeryError, UnsupportedOpError
from tests.models import BUILDERS

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in lines[0]


def test_prune_writes_model_and_report(tmp_path: Path) -> None:
    proc = cli("prune", str(REPO / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "small.onnx"),
               "--ratio", "0.5", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("original", "pruned", "groups", "layers", "fidelity", "criterion", "device", "onnxprune_version"):
        assert key in report
    assert report["pruned"]["params"] < 0.4 * report["original"]["params"]
    assert "params" in proc.stdout and "fidelity" in proc.stdout
    onnx.checker.check_model(str(tmp_path / "small.onnx"), full_check=True)


def test_analyze_table_and_json(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(BUILDERS["resnet_basic"](), model)
    table = cli("analyze", str(model))
    assert table.returncode == 0 and "prunable groups" in table.stdout
    assert "1 removable residual blocks" in table.stdout and "block1.add" in table.stdout
    as_json = json.loads(cli("analyze", str(model), "--json").stdout)
    assert as_json["prunable_groups"] >= 3


def test_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffthis is not a model" * 50)
    assert_one_line_error(cli("prune", str(bad), "-o", str(tmp_path / "o.onnx")), "not a readable ONNX model")


def test_truncated(tmp_path: Path) -> None:
    data = BUILDERS["vgg"]().SerializeToString()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("prune", str(bad), "-o", str(tmp_path / "o.onnx")), "not a readable ONNX model")


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(cli("prune", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")), "does not exist")


def test_no_prunable_groups(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="only")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1] * 12)],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    assert_one_line_error(cli("prune", str(path), "-o", str(tmp_path / "o.onnx")), "no prunable channel groups")


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_ratio_out_of_range(ratio: str, tmp_path: Path) -> None:
    assert_one_line_error(
        cli("prune", str(REPO / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "--ratio", ratio),
        "--ratio must be in [0, 1)",
    )


def test_bad_shape_argument(tmp_path: Path) -> None:
    assert_one_line_error(
        cli("prune", str(REPO / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "--shape", "input=1xAx8"),
        "--shape expects",
    )


def test_unknown_criterion_is_a_usage_error(tmp_path: Path) -> None:
    proc = cli("prune", "m.onnx", "-o", "o.onnx", "--criterion", "magic")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_export_artifacts_then_apply_checkpoint(tmp_path: Path) -> None:
    """The artifacts' checkpoint turns back into an inference model; edited parameters show in its outputs."""
    import numpy as np

    from tests.models import random_inputs, run

    model = BUILDERS["mlp"]()
    onnx.save(model, tmp_path / "m.onnx")
    assert cli("export-artifacts", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "arts")).returncode == 0
    ckpt = dict(np.load(tmp_path / "arts" / "checkpoint.npz"))
    name = next(k for k, v in ckpt.items() if v.ndim == 2)
    ckpt[name] = ckpt[name] * 0.0
    np.savez(tmp_path / "edited.npz", **ckpt)
    proc = cli("apply-checkpoint", str(tmp_path / "m.onnx"), str(tmp_path / "edited.npz"), "-o", str(tmp_path / "t.onnx"))
    assert proc.returncode == 0, proc.stderr
    tuned = onnx.load(tmp_path / "t.onnx")
    weight = next(t for t in tuned.graph.initializer if t.name == name)
    assert not np.any(onnx.numpy_helper.to_array(weight))
    feeds = random_inputs(model)
    assert not np.allclose(run(tuned, feeds)["output"], run(model, feeds)["output"])
    unrelated = tmp_path / "other.npz"
    np.savez(unrelated, nothing=np.zeros(3))
    assert_one_line_error(cli("apply-checkpoint", str(tmp_path / "m.onnx"), str(unrelated), "-o", str(tmp_path / "x.onnx")),
                          "holds no parameter")


def test_heads_dims_and_depth_fidelity_from_the_command_line(tmp_path: Path) -> None:
    """--heads dims keeps the head count and shrinks every head; --depth-method fidelity removes a block."""
    import numpy as np

    from tests.models import build_resnet_bottleneck, build_transformer_block, random_inputs, run

    model = build_transformer_block()
    onnx.save(model, tmp_path / "t.onnx")
    runs = {}
    for heads in ("whole", "dims"):
        out = tmp_path / f"{heads}.onnx"
        proc = cli("prune", str(tmp_path / "t.onnx"), "-o", str(out), "--heads", heads, "--report", str(tmp_path / f"{heads}.json"))
        assert proc.returncode == 0, proc.stderr
        runs[heads] = json.loads((tmp_path / f"{heads}.json").read_text())
        feeds = random_inputs(model)
        assert run(str(out), feeds)["output"].shape == run(model, feeds)["output"].shape
    assert runs["dims"]["spec"]["heads"] == "dims"
    assert runs["dims"]["groups"] != runs["whole"]["groups"]  # a different unit of pruning
    resnet = tmp_path / "r.onnx"
    onnx.save(build_resnet_bottleneck(blocks=3), resnet)
    proc = cli("prune", str(resnet), "-o", str(tmp_path / "rd.onnx"), "--depth", "1", "--depth-method", "fidelity",
               "--ratio", "0", "--report", str(tmp_path / "rd.json"))
    assert proc.returncode == 0, proc.stderr
    depth = json.loads((tmp_path / "rd.json").read_text())["depth"]
    assert depth["method"] == "fidelity" and len(depth["removed"]) == 1
    assert_one_line_error(cli("prune", str(resnet), "-o", str(tmp_path / "x.onnx"), "--heads", "half"), "--heads")


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        # what the verify stage raises when onnxruntime cannot load the pruned model (onnxruntime's messages
        # run over several lines; the CLI still prints one)
        (InvariantError("onnxruntime cannot load the pruned model:\n  Node conv1: channel mismatch"),
         "onnxruntime cannot load the pruned model: Node conv1: channel mismatch"),
        (SurgeryError("slicing conv1.weight failed"), "slicing conv1.weight failed"),
        (KeyError("groups"), "KeyError: 'groups'"),  # a plain bug
    ],
)
def test_internal_failures_exit_1_and_ask_for_a_report(
    error: Exception, shown: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's input was fine and onnxprune failed it: exit 1 and say so, never blame the input (exit 2)."""
    from onnxprune import cli as cli_module

    def failing_prune(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr("onnxprune.pipeline.prune", failing_prune)
    argv = ["prune", str(REPO / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx")]
    assert cli_module.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"onnxprune: internal error: {shown}; please report it (-vv shows the traceback)"]
    assert cli_module.main(["-vv", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_user_errors_keep_exit_2_and_blame_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune import cli as cli_module

    for error in (BadInputError("--calib x.npz does not exist", field="calib"), PlanError("nothing to prune"),
                  UnsupportedOpError("no rule for Foo", op_type="Foo")):
        def failing_prune(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr("onnxprune.pipeline.prune", failing_prune)
        assert cli_module.main(["prune", str(REPO / "examples" / "digits_cnn.onnx"), "-o", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == f"onnxprune: error: {error}\n"
