"""A dataset on S3 against the same dataset on local disk: bytes on the wire and speed.

    python bench/object_storage.py            # 2,000 rows x 256 scored tokens, k=20

The S3 side is moto's S3 server (a local process speaking the S3 protocol, as in the
tests) behind a counting TCP proxy, so every byte the S3 clients send and receive is
measured, HTTP included. Reported, from one run:

- shard bytes per scored token (the dataset's own size; synthetic distributions, less
  compressible than a real teacher's: docs/benchmarks.md has real-text figures);
- bytes sent and received per token while writing (shard uploads, manifest commits,
  existence checks) and while reading every row group decoded, and their ratio to the
  shard bytes (the protocol's overhead); requests when row groups are read one at a
  time in a shuffled order, as a trainer rank reads them;
- write and read tokens/s to S3 against local disk in the same run (a ratio). moto is a
  single-threaded Python server on the same cores, so this ratio bounds the cost of the
  protocol on this machine, not S3's throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3_server import CREDENTIALS, s3_server  # noqa: E402

from distillcache.shared.reader import ShardDataset  # noqa: E402
from distillcache.shared.record import SequenceRecord  # noqa: E402
from distillcache.shared.schema import DatasetInfo  # noqa: E402
from distillcache.shared.writer import ShardWriter  # noqa: E402

VOCAB = 32_000


class CountingProxy:
    """Forwards TCP connections to ``target`` and counts the bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = self.received = self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = self.connections = 0

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            server = socket.create_connection(self.target)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, "sent"), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(server, client, "received"), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def make_records(rows: int, tokens: int, k: int, seed: int = 0) -> list[SequenceRecord]:
    """Rows whose top-k look like a language model's: ids clustered at Zipf-distributed
    places of the vocabulary, log-probs falling off with rank plus noise."""
    rng = np.random.default_rng(seed)
    n = rows * tokens
    base = np.minimum(rng.zipf(1.3, (n, 1)), VOCAB // 2)
    ids = (base + np.cumsum(rng.geometric(0.05, (n, k)), axis=1)) % VOCAB
    logits = -1.5 * np.log(np.arange(1, k + 1)) + rng.normal(scale=1.0, size=(n, k))
    lp = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) - 0.05).astype(np.float32)
    out = []
    for i in range(rows):
        at = slice(i * tokens, (i + 1) * tokens)
        prompt = rng.integers(0, VOCAB, 32).astype(np.int32)
        out.append(
            SequenceRecord(
                key=f"{i:08d}",
                prompt_ids=prompt,
                completion_ids=rng.integers(0, VOCAB, tokens).astype(np.int32),
                topk_ids=ids[at].astype(np.int32),
                topk_logprobs=lp[at],
                token_logprob=lp[at, 0].copy(),
                completion_text="",
                logprob_start=len(prompt),
            )
        )
    return out


def info(k: int) -> DatasetInfo:
    return DatasetInfo(
        teacher_model="bench-teacher",
        tokenizer="bench-tok",
        tokenizer_hash="0" * 64,
        vocab_size=VOCAB,
        logit_width=VOCAB,
        k=k,
        backend="bench",
        backend_version="0",
    )


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=256, help="scored tokens per row")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--shard-rows", type=int, default=500)
    args = parser.parse_args()
    records = make_records(args.rows, args.tokens, args.k)
    tokens = args.rows * args.tokens
    workdir = Path(tempfile.mkdtemp(prefix="bench-object-storage-"))

    def write(where) -> None:
        with ShardWriter(
            where, info(args.k), writer_id="bench", max_shard_rows=args.shard_rows
        ) as w:
            w.write_many(records)

    def read(where) -> None:
        for batch in ShardDataset(where).iter_decoded():
            assert len(batch.topk_ids)

    with s3_server() as url:
        proxy = CountingProxy(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        os.environ.update(CREDENTIALS | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
        import pyarrow.fs as pafs

        pafs.S3FileSystem(
            endpoint_override=url, region="us-east-1", allow_bucket_creation=True
        ).create_dir("bench")
        uri = "s3://bench/ds"
        local = workdir / "ds"
        # Best of two runs each, to fresh datasets (the first also pays for warm-up).
        write_local = min(timed(partial(write, local / str(i))) for i in range(2))
        write_s3 = timed(lambda: write(f"{uri}-warm-up"))
        proxy.reset()
        write_s3 = min(write_s3, timed(lambda: write(uri)))
        up = (proxy.sent, proxy.received, proxy.connections)
        local = local / "0"
        read(local)  # warm the page cache: the local figure is the best case
        read_local = min(timed(lambda: read(local)) for _ in range(3))
        proxy.reset()
        read_s3 = timed(lambda: read(uri))
        down = (proxy.sent, proxy.received, proxy.connections)
        # As a trainer rank reads: one row group at a time, in a shuffled order.
        ds = ShardDataset(uri)
        refs = ds.row_groups()
        np.random.default_rng(0).shuffle(refs)
        proxy.reset()
        for ref in refs:
            ds.read_row_group(ref)
        units = proxy.connections
        ds = ShardDataset(uri)
        shard_bytes = ds.manifest.bytes
        groups = len(ds.row_groups())
    shutil.rmtree(workdir)

    print(
        f"{args.rows:,} rows, {tokens:,} scored tokens, k={args.k}, "
        f"{len(ds.shards)} shards, {groups} row groups"
    )
    print(f"shard bytes / token:          {shard_bytes / tokens:8.2f}")
    print(
        f"write: sent / token           {up[0] / tokens:8.2f}  "
        f"({up[0] / shard_bytes:.3f} x shard bytes; received {up[1] / tokens:.2f} B/token, "
        f"{up[2]} requests)"
    )
    print(
        f"read:  received / token       {down[1] / tokens:8.2f}  "
        f"({down[1] / shard_bytes:.3f} x shard bytes; sent {down[0] / tokens:.2f} B/token, "
        f"{down[2]} requests)"
    )
    print(f"trainer order: {units} requests for {groups} row groups (one by one, shuffled)")
    print(
        f"write tokens/s: local {tokens / write_local:,.0f}, s3 {tokens / write_s3:,.0f} "
        f"(s3/local {write_local / write_s3:.2f})"
    )
    print(
        f"read  tokens/s: local {tokens / read_local:,.0f}, s3 {tokens / read_s3:,.0f} "
        f"(s3/local {read_local / read_s3:.2f})"
    )


if __name__ == "__main__":
    main()
