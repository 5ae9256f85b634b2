"""Checkpoints that load with ``from_pretrained`` and resume a run exactly.

``output_dir/checkpoint-<step>/`` holds:

- the model (``save_pretrained``: config + safetensors) and the tokenizer, so
  ``AutoModelForCausalLM.from_pretrained(checkpoint)`` just works;
- ``optimizer.pt``: the full (unsharded) AdamW state, keyed by parameter name, so it
  loads under DDP, FSDP or a single process alike (``torch.distributed.checkpoint``'s
  state-dict API);
- ``scheduler.pt``; ``trainer_state.json``: step, world size, the run's config;
- ``rank-<r>.pt`` per rank: that rank's data position and RNG states (Python, NumPy,
  torch, CUDA), and under DDP a sha256 of its replica of the weights: replicas that
  drifted apart (a nondeterministic op, an unsynchronized buffer) show up as different
  fingerprints instead of silently training different models.

A checkpoint is written under ``checkpoint-<step>.tmp`` and renamed when every rank has
written its part, so a directory without ``.tmp`` is complete. With several nodes the
output directory must be on a shared file system, as for any torchrun checkpointing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedTokenizerBase

from .config import DATA_ORDER_FIELDS, TrainConfig
from .distributed import DistEnv, barrier
from .stream import DataPosition

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class ResumeState:
    step: int
    position: DataPosition
    sampler: dict[str, Any] | None = None  # the on-policy sampler's RNG (onpolicy.py)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.json").exists()
    ]
    return max(found)[1] if found else None


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint ``config.resume`` names: None, ``auto`` (latest, if any) or a path."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        return latest_checkpoint(config.output_dir)
    path = Path(config.resume)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer_state.json)")
    return path


def check_resumable(path: Path, config: TrainConfig, env: DistEnv) -> None:
    """Refuse a resume that could not continue the same data order."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != env.world:
        raise ValueError(
            f"{path} was written by {state['world_size']} ranks; this run has {env.world}. "
            "Each rank's data position is its own: resume with the same number of ranks."
        )
    saved = state["config"]
    changed = [f for f in DATA_ORDER_FIELDS if saved.get(f) != getattr(config, f)]
    if changed:
        detail = ", ".join(f"{f}: {saved.get(f)!r} -> {getattr(config, f)!r}" for f in changed)
        raise ValueError(f"{path}: cannot resume exactly with a changed data order ({detail})")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective under FSDP: every rank must call it)."""
    return get_model_state_dict(model, options=_FULL)


def save_model(
    directory: Path,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """``save_pretrained`` of the model with an explicit (gathered) state dict.

    A gathered FSDP state dict holds tied weights (lm_head = embed_tokens) as two equal
    tensors, and transformers drops a tied duplicate only when it shares storage; so the
    names of each parameter the model shares are pointed at one tensor first, or the file
    would carry the head twice.
    """
    state = dict(state)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for shared in names.values():
        present = [name for name in shared if name in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    model.save_pretrained(directory, state_dict=state)
    tokenizer.save_pretrained(directory)


def replica_fingerprint(model: nn.Module) -> str:
    """sha256 over this process's copy of every parameter, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tokenizer: PreTrainedTokenizerBase,
    position: DataPosition,
    config: TrainConfig,
    env: DistEnv,
    sharded: bool,
    sampler: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` (every rank calls this). ``model`` is the HF model,
    ``sharded`` whether FSDP holds it in shards (so no rank has a replica to fingerprint),
    ``sampler`` the on-policy sampler's state (its own RNG), kept per rank."""
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    model_state = full_model_state(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp, model, model_state, tokenizer)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier(env)
    rank_state = {
        "position": position.to_dict(),
        "rng": _rng_state(),
        "weights_sha256": None if sharded else replica_fingerprint(model),
        "sampler": sampler,
    }
    torch.save(rank_state, tmp / f"rank-{env.rank}.pt")
    barrier(env)
    if env.main:
        state = {"step": step, "world_size": env.world, "config": config.model_dump(mode="json")}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier(env)
    return final


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    env: DistEnv,
) -> ResumeState:
    """Restore optimizer, scheduler, RNG and data position; the weights were loaded with
    ``from_pretrained(path)`` before the model was wrapped."""
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    # Our own file; RNG states hold NumPy objects that the weights-only loader refuses.
    rank_state = torch.load(path / f"rank-{env.rank}.pt", weights_only=False)
    _set_rng_state(rank_state["rng"])
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    return ResumeState(step, DataPosition(**rank_state["position"]), rank_state.get("sampler"))
