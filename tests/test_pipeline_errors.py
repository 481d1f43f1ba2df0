"""Our own failures are reported as ours: a pruned model onnxruntime refuses is an internal error."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxprune.errors import BadInputError, InvariantError, is_internal
from onnxprune.pipeline import prune
from onnxprune.runtime import session as session_module
from onnxprune.spec import PruneSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits_cnn.onnx"


def test_pruned_model_onnxruntime_refuses_is_internal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = session_module.make_session

    def refuse_pruned(model: object, *args: object, **kwargs: object) -> session_module.Session:
        if isinstance(model, onnx.ModelProto):  # the pruned model is passed in memory, the original by path
            raise BadInputError("onnxruntime cannot load the model: (simulated)", field="model")
        return real(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module, "make_session", refuse_pruned)
    with pytest.raises(InvariantError, match="cannot load the pruned model") as info:
        prune(EXAMPLE, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert is_internal(info.value)
    assert not (tmp_path / "out.onnx").exists()


def test_unreadable_input_stays_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(BadInputError) as info:
        prune(bad, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert not is_internal(info.value)
