"""Runs the example of README.md (its first ```python block) against a live server and checks
what it prints, so the documented example cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import CORPUS

HERE = Path(__file__).resolve().parent


def test_readme_example(server, tmp_path):
    readme = (HERE.parent / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code, "README.md has a ```python block"
    script = tmp_path / "quickstart.py"
    script.write_text(code.group(1), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)],
        env={
            **os.environ,
            "PYTHONPATH": str(HERE.parent / "src"),
            "CHAT_SERVER": server.target,
            "ALICE_TOKEN": server.token("alice"),
            "BOB_TOKEN": server.token("bob"),
            "FILE": str(CORPUS),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.splitlines() == [
        "received: ['Hello Bob 👋', 'Lunch at noon?']",
        "resumed: ['sent while you were away'] cursor: 5",
        "history: ['sent while you were away', 'Lunch at noon?', 'Hello Bob 👋']",
        "same bytes: True",
        "bad token: UNAUTHENTICATED",
    ]
