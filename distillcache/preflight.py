"""Checks that need no model, run before anything loads.

Loading a 70B teacher takes minutes; a typo in a path, an input of the wrong format, a
k the vocabulary cannot hold or an output that cannot be written must not cost them.
Each check raises ``ValueError`` with the flag, the value and the fix, which the `distill`
entry point prints as one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distillcache.shared.inputs import SUFFIXES


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
