"""The one external-data path rule (``onnxprune.io.safety``), one test per rule, and its three front doors:
the loaded model (library), the file on disk (client), the uploaded set of files (server)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.io.safety import (
    check_external_paths,
    check_location,
    external_files,
    locate_in_files,
    resolve_location,
)


def _refused(location: str, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment) as info:
        check_location(location, tensor="W")
    assert info.value.field == "model" and "'W'" in str(info.value)


def test_a_plain_relative_location_is_normalised() -> None:
    assert check_location("w.bin") == "w.bin"
    assert check_location("./sub//w.bin") == "sub/w.bin"
    assert check_location("dense:0") == "dense:0"  # a colon is only a drive when it follows one letter


def test_an_empty_location_is_refused() -> None:
    _refused("", "without a location")


def test_a_nul_byte_is_refused() -> None:
    _refused("w.bin\0.png", "NUL")


@pytest.mark.parametrize("location", ["/etc/passwd", "\\\\server\\share\\w", "C:\\w.bin", "c:w.bin"])
def test_absolute_paths_and_drive_letters_are_refused(location: str) -> None:
    _refused(location, "absolute")


@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin", "..\\w.bin", "sub/.."])
def test_dot_dot_components_are_refused(location: str) -> None:
    _refused(location, "leaves the folder")


def test_the_folder_itself_is_not_a_file() -> None:
    _refused(".", "names the model's folder")
    _refused("./", "names the model's folder")


def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "secret").write_bytes(b"x")
    os.symlink(tmp_path / "secret", tmp_path / "model" / "w.bin")
    with pytest.raises(BadInputError, match="symlink leads out"):
        resolve_location("w.bin", tmp_path / "model", tensor="W")


def test_a_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real.bin").write_bytes(b"x")
    os.symlink(tmp_path / "real.bin", tmp_path / "w.bin")
    assert resolve_location("w.bin", tmp_path) == (tmp_path / "real.bin").resolve()


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="is missing"):
        resolve_location("w.bin", tmp_path, tensor="W")


def test_in_a_set_of_files_the_location_resolves_against_the_models_folder() -> None:
    files = {"sub/m.onnx", "sub/w.bin", "w.bin"}
    assert locate_in_files("w.bin", "sub/m.onnx", files) == "sub/w.bin"
    with pytest.raises(BadInputError, match="not uploaded"):
        locate_in_files("other.bin", "sub/m.onnx", files, tensor="W")
    with pytest.raises(BadInputError, match="leaves the folder"):
        locate_in_files("../w.bin", "sub/m.onnx", files, tensor="W")


def _external(tensor: TensorProto, location: str) -> TensorProto:
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _model_with_subgraph_weight(location: str) -> onnx.ModelProto:
    """The only external tensor sits in an If branch: loaders read it too, so the check must see it."""
    weight = _external(numpy_helper.from_array(np.ones(4, np.float32), "branch_w"), location)
    branch = helper.make_graph([helper.make_node("Identity", ["branch_w"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])], [weight])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_loaded_model_is_checked_down_to_its_subgraphs(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="'branch_w'.*outside the model's folder"):
        check_external_paths(_model_with_subgraph_weight("../../etc/passwd"), tmp_path)
    (tmp_path / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    check_external_paths(_model_with_subgraph_weight("w.bin"), tmp_path)


def test_a_model_file_lists_its_checked_external_files_without_loading(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    onnx.save(_model_with_subgraph_weight("./sub/w.bin"), tmp_path / "m.onnx")
    assert external_files(tmp_path / "m.onnx") == ["sub/w.bin"]
    onnx.save(_model_with_subgraph_weight("/etc/passwd"), tmp_path / "evil.onnx")
    with pytest.raises(BadInputError, match="absolute"):
        external_files(tmp_path / "evil.onnx")
