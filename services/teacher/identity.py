"""Who the teacher is: what the cache keys and every dataset's metadata say about it.

``TeacherIdentity`` is read off a loaded backend once; the service keys every query with
it and the store writes it into ``DatasetInfo``, so a cached row can only ever answer a
query to the teacher that made it. ``model_revision`` pins the weights themselves.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from distillcache.shared.keys import tokenizer_hash
from distillcache.shared.schema import DatasetInfo, LogprobCodec, Sampling

from .backend import TeacherBackend

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def model_revision(model: str | Path, revision: str | None = None) -> str:
    """The revision that identifies these exact weights, for cache keys and metadata.

    A hub id (or a directory inside the Hugging Face cache) gives its commit hash, read
    from the cache's ``snapshots/<commit>`` directory after loading. A plain local
    directory has no commit, so it gets ``dir-sha256:`` + a hash of ``config.json``'s
    bytes and the names and sizes of its weight files: cheap (no weight bytes are read)
    and it changes whenever the checkpoint is rewritten with other shapes or files.
    """
    path = Path(model)
    if path.is_dir():
        resolved = path.resolve()
        if resolved.parent.name == "snapshots":
            return resolved.name
        digest = hashlib.sha256()
        config = resolved / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for file in sorted(resolved.rglob("*")):
            if file.is_file() and file.name.endswith(WEIGHT_SUFFIXES):
                digest.update(f"{file.relative_to(resolved)}\0{file.stat().st_size}\n".encode())
        return "dir-sha256:" + digest.hexdigest()[:16]
    try:
        cached = try_to_load_from_cache(str(model), "config.json", revision=revision)
    except HFValidationError:
        cached = None
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return Path(cached).parent.name
    return revision or "unknown"


@dataclass(frozen=True)
class TeacherIdentity:
    """What the cache keys and dataset metadata say about the teacher."""

    model_id: str
    revision: str
    tokenizer: str
    tokenizer_hash: str
    vocab_size: int
    logit_width: int
    backend: str
    backend_version: str

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
        )

    def dataset_info(self, k: int, codec: LogprobCodec, sampling: Sampling | None) -> DatasetInfo:
        return DatasetInfo(
            teacher_model=self.model_id,
            teacher_revision=self.revision,
            tokenizer=self.tokenizer,
            tokenizer_hash=self.tokenizer_hash,
            vocab_size=self.vocab_size,
            logit_width=self.logit_width,
            k=k,
            logprob_codec=codec,
            sampling=sampling,
            backend=self.backend,
            backend_version=self.backend_version,
        )

    def live_dataset(self, k: int) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(self.model_id).name).strip("-.")[:40]
        digest = hashlib.sha256(
            f"{self.model_id}\0{self.revision}\0{self.tokenizer_hash}".encode()
        ).hexdigest()[:8]
        return f"live-{base or 'teacher'}-{digest}-k{k}"
