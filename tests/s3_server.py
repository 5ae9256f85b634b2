"""A real S3-protocol server for the tests: moto's S3 app over HTTP on a free loopback port.

Run as a process (``python tests/s3_server.py``); it prints its port once it listens. It
serves one request at a time, as a single S3 object is updated atomically on real S3:
moto checks a conditional PUT's ``If-Match`` and then stores the object in two steps, which
a threaded server would let two requests interleave.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "distillcache-test",
    "AWS_SECRET_ACCESS_KEY": "distillcache-test-secret",
    "AWS_REGION": "us-east-1",
    # Never wait on an instance-metadata endpoint for credentials.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def s3_server() -> Iterator[str]:
    """Start the server process; yield its endpoint URL; stop it."""
    proc = subprocess.Popen(
        [sys.executable, __file__], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the S3 server did not start (exit {proc.wait(timeout=30)})")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def s3_environment(bucket: str) -> Iterator[str]:
    """The server with ``bucket`` on it, and the standard AWS variables pointing at it
    (restored afterwards); yield its endpoint URL."""
    import pyarrow.fs as pafs

    with s3_server() as url:
        env = CREDENTIALS | {"AWS_ENDPOINT_URL": url}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        pafs.S3FileSystem(
            endpoint_override=url, region="us-east-1", allow_bucket_creation=True
        ).create_dir(bucket)
        try:
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
