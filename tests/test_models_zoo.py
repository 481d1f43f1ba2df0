"""Every zoo builder yields a valid, runnable, deterministic model (the contract the pruning tests rely on)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.models import BUILDERS, VARIANTS, build, build_vgg, random_inputs, run, zero_channels

ALL = {name: (lambda fn=fn: fn()) for name, fn in BUILDERS.items()} | VARIANTS


@pytest.mark.parametrize("name", sorted(ALL))
def test_builds_checks_and_runs(name: str) -> None:
    model = ALL[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert all(n.name for n in model.graph.node), "every node is named"
    assert len({n.name for n in model.graph.node}) == len(model.graph.node), "node names are unique"
    assert {t.data_type for t in model.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}

    out = run(model, random_inputs(model, batch=2))["output"]
    assert out.shape[0] == 2
    assert np.isfinite(out).all()
    assert out.std() > 1e-3, "outputs vary across the batch / features (weights are not degenerate)"


@pytest.mark.parametrize("name", ["vgg", "transformer_block", "paddle_constants"])
def test_deterministic_and_seeded(name: str) -> None:
    a, b, c = build(name), build(name), build(name, seed=1)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_symbolic_spatial_runs_at_two_sizes() -> None:
    model = build("symbolic_spatial")
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", "", "H", "W"]
    for size in (16, 32):
        out = run(model, random_inputs(model, batch=1, dims={"H": size, "W": size}))["output"]
        assert out.shape == (1, 1, size, size)


def test_batch_dim_is_really_dynamic() -> None:
    model = build_vgg()
    one = run(model, random_inputs(model, batch=1))["output"]
    three = run(model, random_inputs(model, batch=3))["output"]
    assert one.shape == (1, 10) and three.shape == (3, 10)


def test_unknown_builder_names_known_ones() -> None:
    with pytest.raises(KeyError, match="vgg"):
        build("nope")


@pytest.mark.parametrize(
    ("name", "node", "probe"),
    [
        ("vgg", "conv3", "conv3.bn_out"),  # Conv + BN: zero after BN
        ("mlp", "fc2", "fc2_out"),  # Gemm transB=1: zero rows
        ("mlp_matmul", "fc2", "fc2.add_out"),  # MatMul + bias Add
        ("conv_transpose", "up", "up.bn_out"),  # ConvTranspose weight columns
        ("paddle_constants", "conv1", "bn1_out"),  # weights in Constant nodes
        ("paddle_constants", "conv2", "conv2_out"),  # weight behind Identity
    ],
)
def test_zero_channels_gives_exact_zeros(name: str, node: str, probe: str) -> None:
    model = zero_channels(build(name), node, [0, 3])
    value = onnx.helper.make_tensor_value_info(probe, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(value)
    out = run(model, random_inputs(model, batch=2))[probe]  # [N, C, ...] or [N, F]: channels on axis 1
    assert np.all(out[:, [0, 3]] == 0)
    assert np.abs(out[:, [1, 2]]).max() > 0


def test_zero_channels_does_not_mutate_input_and_rejects_unknown() -> None:
    model = build_vgg()
    before = model.SerializeToString()
    zero_channels(model, "conv3", [1])
    assert model.SerializeToString() == before
    with pytest.raises(ValueError, match="no node named"):
        zero_channels(model, "nope", [0])
    with pytest.raises(ValueError, match="not a supported producer"):
        zero_channels(model, "pool", [0])
