"""The built-in VJP rules, one module per op family, gathered into a registry by :func:`default_registry`.

Each family module maps op types to rules in a read-only ``RULES`` table and imports only
:mod:`onnxprune.training.grad.context` and the shared helpers in ``_common``/``_window``.
"""

from __future__ import annotations

from onnxprune.training.grad.context import VJPRegistry
from onnxprune.training.grad.rules import activation, conv, elementwise, layout, linalg, norm, pool, reduce, resize

#: Every built-in family; an op listed in two of them makes :func:`default_registry` raise.
FAMILIES = (elementwise, activation, linalg, conv, pool, norm, reduce, layout, resize)


def default_registry() -> VJPRegistry:
    """A fresh registry with every built-in rule (a new object each call: callers may add their own).

    Raises:
        ValueError: two families register the same op.
    """
    reg = VJPRegistry()
    for family in FAMILIES:
        for op, rule in family.RULES.items():
            reg.register(op, rule)
    return reg
