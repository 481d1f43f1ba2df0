"""The onnxprune gRPC compression service (``onnxprune serve``).

Installed as ``onnxprune.service`` (from the repository's ``service/`` folder), never as a top-level ``service``
package, which any other project could also install.

Layout, outside in: ``server`` (factory, TLS, health, reflection, signals) → ``auth`` (bearer tokens, tenants)
→ ``servicer`` (translates messages only) → ``jobs`` (job lifecycle, retention, quota) → three interfaces, so
that shared storage, a shared database and a fleet executor can replace the local ones later:
``blobs.BlobStore``, ``store.JobStore``, ``executor.Executor``. A job itself is
``tasks.run_task``: a pure function of (spec, input files) → (result files, report) that only calls
``onnxprune.pipeline``.
"""
