"""Generated gRPC stubs for ``protos/onnxprune/v1/compressor.proto`` (regenerate with ``python protos/generate.py``).

Only ``service/`` and ``onnxprune/client.py`` import these: the protobuf format stays at the edges (STYLE.md habit 1).
``convert`` is the one hand-written module here: the single mapping between ``JobSpec`` and ``PruneSpec``.
"""
