"""The one exporter: an edited graphsurgeon graph back to a model like the one it came from.

Every stage that edits a graph (the cut, depth removal, reconstruction, sensitivity candidates) exports
through here, so the IR version, opsets and metadata of the input model survive, and stale shapes that
graphsurgeon keeps on edited tensors never reach shape inference.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import InvariantError
from onnxprune.io.shapes import check_model, infer_shapes


def clear_inferred_shapes(graph: gs.Graph) -> None:
    """Forget intermediate shapes: graphsurgeon keeps stale ones on tensors whose producer was edited."""
    keep = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in keep:
            t.shape = None


def export_graph(graph: gs.Graph, like: onnx.ModelProto, *, check: bool = True) -> onnx.ModelProto:
    """Export ``graph`` with ``like``'s IR version, opsets and metadata.

    Args:
        graph: the edited graph.
        like: the model it was imported from.
        check: re-infer shapes and run the full checker (what a model we hand back gets). Candidates
            that are only run once and thrown away (sensitivity, depth scoring) skip it.

    Raises:
        InvariantError: ``check`` is set and the checker rejects the result.
    """
    clear_inferred_shapes(graph)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.producer_name = "onnxprune"
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    return export_checked(out) if check else out


def export_checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """Re-infer shapes (stale ones dropped first) and run the full checker.

    Raises:
        InvariantError: the checker rejects the model.
    """
    try:
        del model.graph.value_info[:]
        out = infer_shapes(model)
        check_model(out)
    except Exception as e:
        raise InvariantError(f"the pruned model fails onnx.checker: {e}") from e
    return out
