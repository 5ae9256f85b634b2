"""Starting a teacher server and knowing when it can answer: shared by the demo and tests."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    url: str,
    timeout: float = 120.0,
    process: subprocess.Popen | None = None,
    headers: dict[str, str] | None = None,
    poll_s: float = 0.1,
) -> dict:
    """Poll ``url``/readyz until the teacher is loaded; returns the /readyz body.

    Fails early, with the reason, when ``process`` exits or the teacher reports that its
    model failed to load, instead of waiting out ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2, headers=headers)
            body = r.json()
            if r.status_code == 200:
                return body
            if body.get("status") == "failed":
                raise RuntimeError(f"the teacher failed to load: {body.get('error')}")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready after {timeout} s")
