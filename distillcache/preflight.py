"""Checks that need no model, run before anything loads.

Loading a 70B teacher takes minutes; a typo in a path, an input of the wrong format, a
k the vocabulary cannot hold or an output that cannot be written must not cost them.
Each check raises ``ValueError`` with the flag, the value and the fix, which the `distill`
entry point prints as one line.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from distillcache.shared.inputs import SUFFIXES, InputRow, load_input_rows


def model_ref(ref: str, flag: str) -> str:
    """A local model directory (with config.json) or something shaped like a hub id."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{flag} {ref}: not a model directory (no config.json; save one with "
                "save_pretrained)"
            )
        return ref
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ValueError(
            f"{flag} {ref}: no such directory (give a local model directory or a hub id "
            "such as Qwen/Qwen2.5-0.5B)"
        )
    return ref


def vocab_size(ref: str) -> int | None:
    """The vocabulary size a local model's config.json declares (None for hub ids)."""
    config = Path(ref).expanduser() / "config.json"
    if not config.is_file():
        return None
    size = json.loads(config.read_text()).get("vocab_size")
    return int(size) if isinstance(size, int) else None


def input_file(path: Path, flag: str = "INPUT") -> Path:
    if not path.name.lower().endswith(SUFFIXES):
        raise ValueError(
            f"{flag} {path}: unknown input format; accepted: {', '.join(SUFFIXES)} "
            "(JSON lines; a .json file is read as JSON lines too)"
        )
    return path


def prompt_file(path: str, flag: str) -> list[InputRow]:
    """The rows of a prompt file (the input formats `distill cache` accepts), all of them
    good: the first bad row is named as ``path:line: problem``, with how many there are."""
    input_file(Path(path), flag)
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such prompt file")
    rows, errors = load_input_rows(path)
    if errors:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ValueError(f"{flag} {errors[0]}{more}; fix or drop the row")
    if not rows:
        raise ValueError(f"{flag} {path}: no prompts in the file")
    return rows


def writable(path: Path, flag: str) -> Path:
    """``path`` can be created or written: its nearest existing ancestor is a writable
    directory."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")
    return path


def ray_address(address: str | None, flag: str) -> str | None:
    """A ``host:port`` Ray address answers a TCP connection within seconds: Ray's own
    client retries an unreachable GCS for minutes before it gives up. ``auto``, ``ray://``
    (Ray Client) and no address (a new local cluster) are left to Ray, which fails fast."""
    if address is None or address == "auto" or "://" in address:
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{flag} {address}: give host:port, auto, or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(
            f"{flag} {address}: no Ray cluster answers there ({e.strerror or e}); start one "
            "with `ray start --head` or give its address"
        ) from None
    return address
