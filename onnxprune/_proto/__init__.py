"""Generated gRPC stubs for ``protos/onnxprune/v1/compressor.proto`` (regenerate with ``python protos/generate.py``).

Only ``service/`` and ``onnxprune/client.py`` import these: the wire format stays at the edges, away from the stages.
``convert`` is the one hand-written module here: the single mapping between ``JobSpec`` and ``PruneSpec``.
"""
