"""Starts a real chat-service process for the tests: its own SQLite database and attachment
folder in a temporary directory, port 0 (the address is read from the log), tokens minted by
the binary's own ``token`` command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# The shared multilingual corpus: `CHAT_CORPUS` when set (as the Rust corpus test reads it),
# else beside the checkout, where CI's clone finds it.
CORPUS = Path(
    os.environ.get("CHAT_CORPUS") or REPO.parent / "shared" / "corpus" / "dialogs.jsonl"
)
BIN = Path(os.environ.get("CHAT_SERVICE_BIN", REPO / "target" / "debug" / "chat-service"))
SECRET = "client-test-secret-0123456789"


class Server:
    def __init__(self) -> None:
        if not BIN.exists():
            raise RuntimeError(f"no server binary at {BIN}: run `cargo build` or set CHAT_SERVICE_BIN")
        self.dir = tempfile.mkdtemp(prefix="chat-py-test-")
        self.env = {
            **os.environ,
            "DATABASE_URL": f"sqlite://{self.dir}/chat.db",
            "STORAGE_URL": f"file://{self.dir}/attachments",
            "JWT_SECRET": SECRET,
            "GRPC_ADDR": "127.0.0.1:0",
            "LOG_LEVEL": "info",
            # A heartbeat a second: a client that has seen one knows its stream is live.
            "HEARTBEAT_SECONDS": "1",
            "NO_COLOR": "1",
        }
        self.proc = subprocess.Popen(
            [str(BIN), "serve"], env=self.env, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        found = threading.Event()
        self.target = ""

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening.*?addr=(\S+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
                if m and not found.is_set():
                    self.target = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(30):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log))

    def token(self, user: str, ttl: int = 3600) -> str:
        """A token for ``user``; a negative ``ttl`` gives an expired one."""
        return subprocess.run(
            [str(BIN), "token", "--sub", user, f"--ttl={ttl}"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()
