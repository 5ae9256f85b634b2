"""Who the teacher is: what the cache keys and every dataset's metadata say about it.

``TeacherIdentity`` is read off a loaded backend once; the service keys every query with
it and the store writes it into ``DatasetInfo``, so a cached row can only ever answer a
query to the teacher that made it. ``model_revision`` pins the weights themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from distillcache.shared.keys import cache_key, tokenizer_hash
from distillcache.shared.schema import (
    AdaptiveK,
    DatasetInfo,
    LogprobCodec,
    SampledLogits,
    Sampling,
)

from .backend import Query, TeacherBackend

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
# Besides the weights, these files change what a checkpoint computes or where it stops.
CONFIG_FILES = ("config.json", "generation_config.json")
# Bytes hashed per read; a 70B checkpoint hashes at disk speed, once (see _file_sha256).
_HASH_CHUNK = 1 << 24


def model_revision(model: str | Path, revision: str | None = None) -> str:
    """The revision that identifies these exact weights, for cache keys and metadata.

    A hub id (or a directory inside the Hugging Face cache) gives its commit hash, read
    from the cache's ``snapshots/<commit>`` directory after loading. A plain local
    directory has no commit, so it gets ``sha256:`` + a hash of its config files and the
    contents of its weight files: two fine-tunes of one architecture have the same file
    names and sizes, and must never share cached answers. The weights are read once;
    their hashes are remembered by (path, size, mtime, inode) in the user's cache
    directory, so a restart does not read them again.
    """
    path = Path(model)
    if path.is_dir():
        resolved = path.resolve()
        if resolved.parent.name == "snapshots":
            return resolved.name
        digest = hashlib.sha256()
        for name in CONFIG_FILES:
            if (resolved / name).is_file():
                digest.update(f"{name}\0".encode() + (resolved / name).read_bytes())
        memo = _HashMemo()
        for file in sorted(resolved.rglob("*")):
            if file.is_file() and file.name.endswith(WEIGHT_SUFFIXES):
                digest.update(f"{file.relative_to(resolved)}\0{memo.sha256(file)}\n".encode())
        memo.save()
        return "sha256:" + digest.hexdigest()[:32]
    try:
        cached = try_to_load_from_cache(str(model), "config.json", revision=revision)
    except HFValidationError:
        cached = None
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return Path(cached).parent.name
    return revision or "unknown"


class _HashMemo:
    """sha256 of files, remembered by their stat in ``<cache>/distillcache/file-sha256.json``
    (``$XDG_CACHE_HOME``, else ``~/.cache``). A file rewritten in place changes its mtime
    or size, so a stale entry is never used; an unwritable cache directory only costs a
    re-read next time."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        self.path = Path(base) / "distillcache" / "file-sha256.json"
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, file: Path) -> str:
        st = file.stat()
        stamp = f"{file}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
        if stamp not in self.known:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
            self.known[stamp] = digest.hexdigest()
            self.changed = True
        return self.known[stamp]

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        except OSError:
            pass


@dataclass(frozen=True)
class TeacherIdentity:
    """What the cache keys and dataset metadata say about the teacher.

    ``model_id`` is a label (the hub id or the path it was loaded from); the weights are
    identified by ``revision`` (a hub commit, or a content hash), so the same directory
    by a relative and an absolute path is one teacher. ``backend`` and ``dtype`` are the
    numerics: the same weights through another engine or precision are another teacher
    to the cache.
    """

    model_id: str
    revision: str
    tokenizer: str
    tokenizer_hash: str
    vocab_size: int
    logit_width: int
    backend: str
    backend_version: str
    dtype: str

    @property
    def weights(self) -> str:
        """The weights' identity: the revision, or the model id when it has none."""
        return self.model_id if self.revision == "unknown" else self.revision

    @property
    def numerics(self) -> str:
        return f"{self.backend}/{self.dtype}"

    @classmethod
    def of(cls, backend: TeacherBackend) -> TeacherIdentity:
        tok = backend.tokenizer
        return cls(
            model_id=backend.model_id,
            revision=backend.revision,
            tokenizer=str(getattr(tok, "name_or_path", "") or backend.model_id),
            tokenizer_hash=tokenizer_hash(tok),
            vocab_size=backend.vocab_size,
            logit_width=backend.logit_width,
            backend=backend.name,
            backend_version=backend.version,
            dtype=backend.dtype,
        )

    def key(self, query: Query) -> str:
        """The cache key of ``query`` to this teacher (shared/keys.py): the one definition
        the service, batch jobs and the scale-out planner all key rows by."""
        return cache_key(
            teacher=self.weights,
            numerics=self.numerics,
            tokenizer_hash=self.tokenizer_hash,
            prompt_ids=query.prompt_ids,
            mode=query.mode,
            k=query.key_k,
            sampling=query.key_sampling(),
            completion_ids=query.completion_ids if query.mode == "score" else None,
        )

    def dataset_info(
        self,
        k: int,
        codec: LogprobCodec,
        sampling: Sampling | None,
        adaptive: AdaptiveK | None = None,
        sampled: SampledLogits | None = None,
    ) -> DatasetInfo:
        """What a dataset of this teacher's answers records. A sampled dataset's k is its
        draw count and its codec float32 (its only log-probs are ``token_logprob``)."""
        if sampled is not None:
            k, codec = sampled.draws, "float32"
        return DatasetInfo(
            teacher_model=self.model_id,
            teacher_revision=self.revision,
            tokenizer=self.tokenizer,
            tokenizer_hash=self.tokenizer_hash,
            vocab_size=self.vocab_size,
            logit_width=self.logit_width,
            k=k,
            adaptive=adaptive,
            sampled=sampled,
            logprob_codec=codec,
            sampling=sampling,
            backend=self.backend,
            backend_version=self.backend_version,
            dtype=self.dtype,
        )

    def live_dataset(
        self, k: int, adaptive: AdaptiveK | None = None, sampled: SampledLogits | None = None
    ) -> str:
        """The live dataset of top-``k`` answers; one per adaptive-k rule too (a dataset
        has one rule), named ``...-k<k>-a<hash of the rule>``; one per sampled mode,
        ``...-k<N>-s<hash of the mode>``."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(self.model_id).name).strip("-.")[:40]
        digest = hashlib.sha256(
            f"{self.weights}\0{self.numerics}\0{self.tokenizer_hash}".encode()
        ).hexdigest()[:8]
        name = f"live-{base or 'teacher'}-{digest}-k{k}"
        if adaptive is not None:
            name += "-a" + hashlib.sha256(adaptive.model_dump_json().encode()).hexdigest()[:8]
        if sampled is not None:
            name += "-s" + hashlib.sha256(sampled.model_dump_json().encode()).hexdigest()[:8]
        return name
