"""The package builds into a wheel (with the pinned setuptools, offline) that carries the
generated code, its ``.pyi`` stubs and ``py.typed``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def test_wheel_carries_code_and_stubs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(tmp_path), str(PACKAGE)],
        check=True,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("chat_service_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("types", "chat_service", "group_service", "attachment_service"):
        assert f"chat_service_client/chat/v1/{module}_pb2.py" in names
        assert f"chat_service_client/chat/v1/{module}_pb2.pyi" in names
    assert "chat_service_client/chat/v1/chat_service_pb2_grpc.py" in names
    assert "chat_service_client/py.typed" in names
    assert "chat_service_client/__init__.py" in names
