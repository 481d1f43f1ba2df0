"""Real cluster components for the scale-out tests, started on 127.0.0.1 by the tests themselves.

- :class:`PostgresServer`: the distribution's ``initdb``/``pg_ctl`` into a temporary data directory on a free port
  (as the ``postgres`` user when the tests run as root, which PostgreSQL refuses).
- :class:`RayCluster`: ``ray start --head`` plus one worker node (``ray start --address``), one CPU each, a
  small object store, fast node-death detection; stopped with ``ray stop``.

Every wait is bounded; a component that does not come up fails the fixture with its log.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

SERVER_BINARIES = ("/usr/local/bin", "/usr/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when the server package is not installed."""
    for folder in SERVER_BINARIES:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


class PostgresServer:
    """A throw-away PostgreSQL server; ``url`` is a superuser URL on database ``postgres``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="onnxprune-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged account
            self._user = "postgres" if _has_user("postgres") else "nobody"
            shutil.chown(self.root, user=self._user)
        self.user = "onnxprune"
        self._pg("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> None:
        argv = [str(self.bin_dir / tool), *args]
        if self._user:
            argv = ["runuser", "-u", self._user, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr[-2000:]}{proc.stdout[-1000:]}")

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database (one per test); returns its URL."""
        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c max_connections=200"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class RayCluster:
    """Ray nodes on this machine: the head (no GPU) and worker nodes with one declared GPU and the resource
    ``worker_node``."""

    def __init__(self, worker_nodes: int = 1) -> None:
        self.ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.worker_manager_port = free_port()
        # Token authentication off: a token file left in ~/.ray by any local ray.init() would otherwise switch it
        # on for the head only. The tests' drivers (this process, the replicas) inherit the setting.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.env = dict(os.environ, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5",
                        RAY_health_check_initial_delay_ms="0", RAY_USAGE_STATS_ENABLED="0",
                        RAY_memory_monitor_refresh_ms="0")
        common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", "100000000",
                  "--include-dashboard", "false", "--disable-usage-stats"]
        self._run("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port), *common,
                  "--resources", '{"head_node": 1}', "--min-worker-port", "20000", "--max-worker-port", "20999")
        self.nodes = 1
        try:
            for _ in range(worker_nodes):
                self.start_worker_node()
        except BaseException:
            self.close()  # never leave a head running behind a failed start
            raise

    def _run(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([self.ray, *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed: {proc.stderr[-3000:]}{proc.stdout[-2000:]}")
        return proc.stdout

    def start_worker_node(self) -> None:
        """Add a worker node (one CPU, resource ``worker_node``); ``kill_worker_node`` kills the latest one.

        The node declares one GPU (``--num-gpus 1``; Ray only counts it), so a ``device=cuda`` job's request for a
        GPU can only be placed here: the tests see GPU-aware placement without a GPU.
        """
        self.worker_manager_port = free_port()
        self._run("start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                  "--num-gpus", "1", "--object-store-memory", "100000000", "--disable-usage-stats",
                  "--resources", '{"worker_node": 1}', "--node-manager-port", str(self.worker_manager_port),
                  "--min-worker-port", "21000", "--max-worker-port", "21999")
        self.nodes += 1
        self.wait_nodes(self.nodes)

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))" % self.address],
            capture_output=True, text=True, timeout=60, env=self.env)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1

    def wait_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray cluster has {alive} live nodes after {timeout} s, expected {count}")
            time.sleep(1)

    def kill_worker_node(self) -> None:
        """SIGKILL the worker node's raylet and the processes it started (a machine that dies)."""
        raylets = _pids_with(f"--node_manager_port={self.worker_manager_port}")
        if not raylets:
            raise RuntimeError("worker node raylet not found")
        victims = set(raylets)
        for pid in raylets:
            victims |= _descendants(pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes -= 1

    def signal_gcs(self, sig: int) -> None:
        """Send ``sig`` to the head's GCS server (SIGSTOP: the cluster stops answering; SIGCONT: it is back)."""
        pids = [pid for pid in _pids_with(f"--gcs_server_port={self.port}") if "gcs_server" in
                Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")]
        if not pids:
            raise RuntimeError(f"no gcs_server process for port {self.port}")
        for pid in pids:
            os.kill(pid, sig)

    def close(self) -> None:
        try:
            self._run("stop", "--force", timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass


def _pids_with(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


# -- fixtures (imported by conftest.py, so each component starts once per test session) ------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session; tests take a fresh database each with ``postgres.new_database()``."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/local/bin, /usr/bin or "
                    "/usr/lib/postgresql/*/bin; install the distribution's postgresql package (.ci/run does)")
    pytest.importorskip("psycopg", reason="psycopg is in the test extra: pip install -e '.[test]'")
    server = PostgresServer(bin_dir)
    yield server
    server.close()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster on 127.0.0.1 for the session (``ray stop`` afterwards)."""
    pytest.importorskip("ray", reason="ray is in the test extra: pip install -e '.[test]'")
    cluster = RayCluster()
    yield cluster
    cluster.close()
