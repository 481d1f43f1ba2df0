"""The onnxprune gRPC compression service (``onnxprune serve``).

Installed as ``onnxprune.service`` (from the repository's ``service/`` folder), never as a top-level ``service``
package, which any other project could also install.

Layout, outside in: ``server`` (factory, TLS, health, reflection, signals) → ``auth`` (bearer tokens, tenants)
→ ``servicer`` (translates messages only) → ``jobs`` (job lifecycle, retention, quota, and with a shared store
the replica's dispatcher) → three interfaces, each with an embedded and a fleet implementation:
``blobs.BlobStore`` (``DirBlobStore``: a local or shared folder; ``FsspecBlobStore``: S3-compatible storage),
``store.JobStore`` (``SqliteJobStore``; ``pgstore.PostgresJobStore``, shared by API replicas) and
``executor.Executor`` (``LocalProcessExecutor``; ``rayexec.RayExecutor``, jobs as Ray tasks). The fleet modules
import ray and psycopg, so only ``server`` imports them, and only when asked to (docs/deploy.md). A job itself is
``tasks.run_task``: a pure function of (spec, input files) → (result files, report) that only calls
``onnxprune.pipeline``.
"""
