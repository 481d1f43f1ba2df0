"""The onnxprune gRPC compression service (``onnxprune serve``).

Layout, outside in: ``server`` (factory, TLS, health, reflection, signals) → ``auth`` (bearer tokens, tenants)
→ ``servicer`` (translates messages only) → ``jobs`` (job lifecycle, retention, quota) → the three interfaces
DESIGN.md "Scale-out" asks for: ``blobs.BlobStore``, ``store.JobStore``, ``executor.Executor``. A job itself is
``tasks.run_task``: a pure function of (spec, input files) → (result files, report) that only calls
``onnxprune.pipeline``.
"""
