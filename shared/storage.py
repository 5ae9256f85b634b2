"""Where a dataset's files live: a local directory or a prefix on S3, behind one interface.

A dataset is named by a plain path (a local directory, as always) or by a URI
``s3://bucket/prefix/ds``. Everything above this module (writer, manifest, reader)
speaks to a ``Storage``; only the few operations whose guarantees differ between a POSIX
directory and an object store are implemented twice, here:

- **Placing a finished shard under its final name.** Locally: the shard was written to a
  hidden temporary name in the dataset directory, fsynced, and is renamed; the directory
  is fsynced before the manifest names it. On S3: the same temporary file is written in a
  local spool directory, uploaded to a hidden temporary key and copied on the server to
  its final key (``S3Storage.place`` says why not straight there); an object is
  invisible until its PUT, multipart upload or copy completes, so no reader ever sees a
  partial shard, and a writer killed mid-upload leaves nothing under a final name (at
  most an incomplete multipart upload, which a bucket lifecycle rule removes).
- **Committing the manifest** (``read_versioned`` / ``write_versioned``), a
  read-modify-write that must not lose a concurrent writer's shards. Locally the writers
  hold ``flock`` on ``.manifest.lock`` while they do it (``manifest.update_manifest``).
  On S3 the write is conditional: ``If-Match: <ETag read>`` (or ``If-None-Match: *``
  when there was no manifest); a writer that lost the race gets 412 and redoes its
  read-modify-write on the new manifest. pyarrow.fs has no conditional write (Arrow
  issue 44281: its S3 output streams send plain PUTs) and shows no ETag, so the commit's
  two requests (the GET that reads the ETag, the conditional PUT) go through botocore;
  every other byte (shards, readers' manifest reads, listings) goes through ``pyarrow.fs``.

Configuration is the AWS SDKs' standard environment, read once into ``S3Config``:
credentials by the SDKs' own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance roles), the endpoint from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, any S3-compatible store),
the region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs


class DatasetError(Exception):
    """A dataset is missing, malformed, or a shard in it is damaged, or its location cannot
    be used (a bad URI, a missing bucket, no credentials); the message names it."""


class VersionConflict(Exception):
    """A conditional write lost: someone changed the object since it was read."""


_LOCK = ".manifest.lock"

# S3 bucket naming rules (3-63 characters, lowercase letters, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` names (object storage); plain paths are local."""
    return isinstance(location, str) and "://" in location


class Storage(abc.ABC):
    """One dataset's files: ``where(name)`` for messages, and the operations on them."""

    location: str  # how the user named the dataset, for messages
    remote: bool = False  # every request is a network round trip
    fs: pafs.FileSystem
    base: str  # the dataset's path inside ``fs``

    @abc.abstractmethod
    def where(self, name: str) -> str:
        """A file of the dataset, as messages name it."""

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type != pafs.FileType.NotFound

    def stamp(self, name: str) -> tuple[int, ...]:
        """Changes whenever the file is replaced or rewritten (size, mtime, ...); raises
        FileNotFoundError when there is no such file."""
        info = self.fs.get_file_info(self._path(name))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.where(name))
        return (info.size, info.mtime_ns or 0)

    def open_input(self, name: str) -> pa.NativeFile:
        """Random access to a file: Parquet reads its footer, then only the row groups
        asked for (ranged GETs on S3)."""
        return self.fs.open_input_file(self._path(name))

    def read_bytes(self, name: str) -> bytes | None:
        """The whole of a small file (the manifest), None if there is none."""
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self._path(name)) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def names(self) -> list[str]:
        """The file names directly in the dataset (none if it does not exist)."""
        selector = pafs.FileSelector(self.base, allow_not_found=True)
        return sorted(
            i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File
        )

    def move(self, src: str, dst: str) -> None:
        self.fs.move(self._path(src), self._path(dst))

    # What differs between a directory and an object store.

    @abc.abstractmethod
    def check_dataset_place(self) -> None:
        """Raise DatasetError when the location cannot hold a dataset (a file is there)."""

    @abc.abstractmethod
    def staging(self) -> Path:
        """The local directory a shard is written in before ``place`` (created)."""

    @abc.abstractmethod
    def place(self, tmp: Path, name: str) -> None:
        """Make the complete, fsynced local file ``tmp`` the dataset's file ``name``,
        atomically (a reader sees all of it or nothing); ``tmp`` is gone afterwards."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every ``place`` so far durable before a manifest names the files."""

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Held around a read-modify-write of the manifest: serializes local writers
        (``flock`` on ``.manifest.lock``); object storage needs none (its writes are
        conditional)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def read_versioned(self, name: str) -> tuple[bytes | None, str | None]:
        """(content or None, a version that ``write_versioned`` checks)."""

    @abc.abstractmethod
    def write_versioned(self, name: str, data: bytes, version: str | None) -> None:
        """Replace ``name`` atomically with ``data`` if it is still at ``version`` (None:
        if it still does not exist); raise VersionConflict if not. Locally the caller holds
        the dataset's lock, which is the check."""


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.fs = pafs.LocalFileSystem()
        self.base = str(self.root.absolute())

    def where(self, name: str) -> str:
        return str(self.root / name)

    def stamp(self, name: str) -> tuple[int, ...]:
        st = (self.root / name).stat()
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def check_dataset_place(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"{self.root}: a file, not a dataset directory")

    def staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def place(self, tmp: Path, name: str) -> None:
        os.replace(tmp, self.root / name)

    def sync(self) -> None:
        fsync_dir(self.root)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / _LOCK, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read_versioned(self, name: str) -> tuple[bytes | None, str | None]:
        return self.read_bytes(name), None

    def write_versioned(self, name: str, data: bytes, version: str | None) -> None:
        """Write a temporary file, fsync it, rename it over ``name``, fsync the directory."""
        tmp = self.root / f"{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
        except OSError:
            # The old file stands; a half-written temporary must not take disk or confuse.
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class S3Config:
    """The S3 settings both clients (pyarrow.fs and botocore) are built from."""

    endpoint: str | None
    region: str

    @classmethod
    def from_env(cls) -> S3Config:
        env = os.environ
        endpoint = None
        for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            endpoint = env.get(variable)
            if endpoint:
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    raise DatasetError(
                        f"{variable}={endpoint} is not a URL; give its scheme, e.g."
                        f" http://{endpoint}"
                    )
                break
        return cls(
            endpoint=endpoint or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


@cache
def _clients(config: S3Config) -> tuple[pafs.S3FileSystem, object]:
    """One pyarrow filesystem and one botocore client per configuration and process."""
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    options: dict = {"region": config.region, "connect_timeout": 5, "request_timeout": 60}
    if config.endpoint:
        split = urlsplit(config.endpoint)
        options |= {"endpoint_override": split.netloc, "scheme": split.scheme}
    s3 = session.create_client(
        "s3",
        region_name=config.region,
        endpoint_url=config.endpoint,
        config=botocore.config.Config(
            connect_timeout=5,
            retries={"max_attempts": 3, "mode": "standard"},
            # A custom endpoint (MinIO, moto) serves buckets as paths, as pyarrow asks.
            s3={"addressing_style": "path"} if config.endpoint else None,
        ),
    )
    return pafs.S3FileSystem(**options), s3


def _check_credentials() -> None:
    """Fail early and plainly where the SDKs' chain finds no credentials (a request
    would otherwise fail with a long signature error, or hang on instance metadata)."""
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise DatasetError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            " (or AWS_PROFILE)"
        )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class S3Storage(Storage):
    remote = True

    def __init__(self, uri: str) -> None:
        split = urlsplit(uri)
        bucket, prefix = split.netloc, split.path.strip("/")
        if not _BUCKET.match(bucket) or split.query or split.fragment or "//" in split.path:
            raise DatasetError(
                f"{uri}: not a dataset URI; write s3://BUCKET/PREFIX (bucket names are 3-63"
                " lowercase letters, digits, dots and hyphens)"
            )
        self.location = uri.rstrip("/")
        self.bucket, self.prefix = bucket, prefix
        try:
            _check_credentials()
            self.fs, self._s3 = _clients(S3Config.from_env())
        except DatasetError as e:
            raise DatasetError(f"{self.location}: {e}") from None
        self.base = f"{bucket}/{prefix}" if prefix else bucket
        try:
            bucket_info = self.fs.get_file_info(bucket)
        except OSError as e:
            raise DatasetError(f"{self.location}: cannot reach S3 ({_one_line(e)})") from None
        if bucket_info.type == pafs.FileType.NotFound:
            raise DatasetError(
                f"{self.location}: bucket {bucket} does not exist (or these credentials cannot"
                " see it); create it first"
            )

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check_dataset_place(self) -> None:
        if self.prefix and self.fs.get_file_info(self.base).type == pafs.FileType.File:
            raise DatasetError(f"{self.location}: an object, not a dataset prefix")

    def staging(self) -> Path:
        spool = Path(tempfile.gettempdir()) / "distillcache-spool"
        spool.mkdir(parents=True, exist_ok=True)
        return spool

    def place(self, tmp: Path, name: str) -> None:
        """Upload to a hidden temporary key, then copy it to ``name`` on the server.

        Not straight to ``name``: a pyarrow S3 output stream has no abort, and closing it
        (which a failed copy's ``with`` does) completes the upload with what was sent, so
        a failure halfway would leave a truncated object under a final name. CopyObject
        makes ``name`` appear whole or not at all; what a failure leaves is a hidden
        ``.tmp`` object that no reader reads (``distill verify`` notes it).
        """
        upload = self._path(f".{name}.tmp")
        with open(tmp, "rb") as src, self.fs.open_output_stream(upload) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        self.fs.move(upload, self._path(name))
        tmp.unlink()

    def sync(self) -> None:
        """A completed PUT is durable and visible to every reader (S3 is strongly
        consistent for reads and listings since December 2020)."""

    def read_versioned(self, name: str) -> tuple[bytes | None, str | None]:
        try:
            got = self._s3.get_object(Bucket=self.bucket, Key=self._key(name))
        except self._s3.exceptions.NoSuchKey:
            return None, None
        return got["Body"].read(), got["ETag"]

    def write_versioned(self, name: str, data: bytes, version: str | None) -> None:
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **condition)
        except self._s3.exceptions.ClientError as e:
            # 412: the object changed (or appeared) since it was read; 409: another
            # conditional write to it was in flight. Either way: read again and redo.
            if e.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise VersionConflict(self.where(name)) from None
            raise OSError(f"{self.where(name)}: {_one_line(e)}") from None


def open_storage(location: str | os.PathLike | Storage) -> Storage:
    """The storage of a dataset named by a path or a URI (a Storage is returned as it is)."""
    if isinstance(location, Storage):
        return location
    if not is_uri(location):
        return LocalStorage(location)
    scheme = urlsplit(str(location)).scheme.lower()
    if scheme == "s3":
        return S3Storage(str(location))
    if scheme == "file":
        return LocalStorage(urlsplit(str(location)).path)
    raise DatasetError(
        f"{location}: storage {scheme}:// is not supported; name a local directory or"
        " s3://BUCKET/PREFIX"
    )


def backoff(attempt: int) -> None:
    """Wait before retrying a lost conditional write: exponential, with jitter, so that
    writers that collided do not collide again in step."""
    time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + int.from_bytes(os.urandom(1)) / 255))
