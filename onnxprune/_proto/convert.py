"""The one mapping between the wire ``JobSpec`` and :class:`onnxprune.spec.PruneSpec`.

Both edges (``service/`` and ``onnxprune/client.py``) use these two functions, so a new PruneSpec option
needs a proto field and nothing else; ``tests/test_service_proto.py`` fails when the two drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxprune._proto import compressor_pb2 as pb
from onnxprune.errors import BadInputError
from onnxprune.spec import PruneSpec

_REPEATED = ("exclude", "quant_exclude")
_MAP = "shapes"


def spec_to_proto(spec: PruneSpec) -> pb.JobSpec:
    """Encode every option of ``spec``; ``None`` options stay unset so the receiver applies the default.

    Raises:
        BadInputError: when an option has a type the wire format cannot carry (e.g. a float ``round_to``).
    """
    msg = pb.JobSpec()
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == _MAP:
            for name, dims in value.items():
                msg.shapes[name].dims.extend(int(d) for d in dims)
        elif f.name in _REPEATED:
            getattr(msg, f.name).extend(value)
        elif value is not None:
            try:
                setattr(msg, f.name, value)
            except (TypeError, ValueError) as e:
                raise BadInputError(f"option {f.name}={value!r} has the wrong type: {e}", field=f.name) from e
    return msg


def spec_from_proto(msg: pb.JobSpec) -> PruneSpec:
    """Decode and validate a wire spec; unset fields take PruneSpec's defaults.

    Raises:
        BadInputError: naming the offending option, from :meth:`PruneSpec.validate`.
    """
    data: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        if field.name == _MAP:
            data[_MAP] = {name: list(shape.dims) for name, shape in msg.shapes.items()}
        elif field.name in _REPEATED:
            data[field.name] = list(getattr(msg, field.name))
        elif msg.HasField(field.name):
            data[field.name] = getattr(msg, field.name)
    return PruneSpec.from_dict(data).validate()
