"""A Reshape target entry computed from another group's channel count (issue 11, CoaT-Lite).

timm's CoaT writes ``qkv(x).reshape(B, N, 3, h, C // h)`` with C read by ``Shape`` from the residual stream.
The entry ``C // h`` is the head dim of the qkv tensor, which no cut of the stream changes: the stream stays
prunable and the entry is frozen at its original value when the stream is cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.analysis.core import FixupKind
from onnxprune.io.export import export_graph
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import cut_channels
from tests.models import run
from tests.test_groups import _group_of
from tests.test_transformer import _analysis_with, _assert_exact, _zero_groups

DIM, HEADS, TOKENS, FEATURES = 16, 4, 6, 8


def _export_coat(path: Path) -> onnx.ModelProto:
    """Embed → one CoaT-style block (LayerNorm, qkv reshaped with C read by Shape, attention, proj, residual,
    MLP) → mean over tokens → classifier; batch symbolic, TorchScript export."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.qkv, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.norm2, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

        def forward(self, x):
            h = self.norm1(x)
            b, n, c = h.shape
            qkv = self.qkv(h).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            x = x + self.proj(y)
            return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.block, self.head = nn.Linear(FEATURES, DIM), Block(), nn.Linear(DIM, 5)

        def forward(self, x):
            return self.head(self.block(self.embed(x)).mean(1))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.randn(2, TOKENS, FEATURES),), str(path), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False, dynamic_axes={"input": {0: "N"}})
    return onnx.load(path)


@pytest.fixture(scope="module")
def coat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("coat") / "coat.onnx"
    _export_coat(path)
    return path


def _feeds(batch: int = 3) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(1).standard_normal((batch, TOKENS, FEATURES)).astype(np.float32)}


def test_stream_read_by_shape_for_the_head_dim_stays_prunable(coat: Path) -> None:
    _, a = _analysis_with(onnx.load(coat))
    stream, heads = _group_of(a, "/embed/MatMul"), _group_of(a, "/block/qkv/MatMul")
    assert stream.prunable == DIM and stream.approximate, stream.reasons  # approximate: through the LayerNorm
    assert heads.size == heads.prunable == HEADS
    assert [f for f in a.fixups if f.kind == FixupKind.SHAPE_FREEZE]


def test_stream_cut_keeps_the_head_dim(coat: Path) -> None:
    """Only the stream is cut: the qkv reshape keeps C // h of the original, the merge reshape the kept C."""
    model = onnx.load(coat)
    graph, a = _analysis_with(model)
    stream = _group_of(a, "/embed/MatMul")
    cut_channels(graph, a, stream.classes[: DIM // 2])
    pruned = export_graph(graph, model)
    out = run(pruned, _feeds())["output"]
    assert out.shape == (3, 5) and np.isfinite(out).all()
    frozen = next(f for f in a.fixups if f.kind == FixupKind.SHAPE_FREEZE)
    assert frozen.data["value"] == DIM // HEADS


def test_head_cut_alone_is_exact(coat: Path) -> None:
    zeroed, chosen = _zero_groups(onnx.load(coat), lambda g: "/block/qkv/MatMul" in g.producers, ratio=0.5)
    assert len(chosen) == HEADS // 2
    _assert_exact(zeroed, chosen)


def test_pruning_stream_and_heads_at_half_runs(coat: Path, tmp_path: Path) -> None:
    result = prune(coat, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    kept = {tuple(g["producers"]): g["kept"] for g in result.report["groups"]}
    assert kept[("/embed/MatMul", "/block/proj/MatMul", "/block/fc2/MatMul")] < DIM
    assert kept[("/block/qkv/MatMul",)] < HEADS
    out = run(onnx.load(result.output_path), _feeds())["output"]
    assert out.shape == (3, 5) and np.isfinite(out).all()
