"""What ``pip install onnxprune`` puts into site-packages: one ``onnxprune`` package, the server inside it.

A top-level ``service`` package would collide with any other project that picked the same plain name, so the
repository's ``service/`` folder must install as ``onnxprune.service``. Checked on a really built wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the build reads; copied so the build's egg-info and build/ folders never land in the working tree.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "onnxprune", "service")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Path → bytes of the metadata files (names of all files, with empty bytes for the rest)."""
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "dist"
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("onnxprune-*.whl")
    with zipfile.ZipFile(built) as z:
        return {n: z.read(n) if ".dist-info/" in n else b"" for n in z.namelist()}


@pytest.mark.slow
def test_wheel_has_no_top_level_service_package(wheel: dict[str, bytes]) -> None:
    top = {name.split("/", 1)[0] for name in wheel}
    assert {t for t in top if not t.endswith(".dist-info")} == {"onnxprune"}
    assert not any(name.startswith("service/") for name in wheel)
    assert {"onnxprune/service/__init__.py", "onnxprune/service/server.py", "onnxprune/service/worker.py"} <= set(wheel)
    (top_level,) = (data for name, data in wheel.items() if name.endswith(".dist-info/top_level.txt"))
    assert top_level.decode().split() == ["onnxprune"]


def test_server_imports_under_the_onnxprune_name() -> None:
    import onnxprune.service.server as server

    assert server.__name__ == "onnxprune.service.server"
    assert Path(server.__file__).parts[-2:] == ("service", "server.py")
