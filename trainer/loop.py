"""The training loop: AdamW, warmup + cosine, accumulation, clipping, eval, checkpoints.

One optimizer step takes ``grad_accum`` micro-batches per rank. The loss is a per-token
mean over every target position of the step on every rank: the micro-batches are read
first, their positions are counted and summed over ranks, and each micro-batch's summed
loss is divided by that count (times the world size, which DDP's and FSDP's gradient
averaging divides out again). So short and long sequences weigh the same whatever the
batch layout or the number of ranks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from distillcache.shared.inputs import ensure_pad_token

from .aligned_data import iter_aligned_batches, open_aligned_data
from .batching import iter_batches
from .checkpoint import (
    check_resumable,
    full_model_state,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_model,
)
from .config import TrainConfig
from .cross_tokenizer import cross_spec
from .data import RunData, open_data
from .distributed import DistEnv, all_reduce_sum, init_distributed, is_fsdp, shutdown, unwrap, wrap
from .evaluate import evaluate
from .metrics import MetricsLog
from .onpolicy import OnPolicy, load_prompts
from .onpolicy_cross import open_cross_onpolicy
from .sparse_kd import LossSpec
from .stream import DataPosition, iter_examples, iter_held_out
from .student import DistillStudent, check_tokenizer, load_student, load_tokenizer
from .teacher_client import TeacherClient


def train(config: TrainConfig) -> Path:
    """Run (or resume) training; returns the final model's directory (``output_dir``), or
    the checkpoint written when ``stop_at_step`` ended the invocation early."""
    env = init_distributed(config.device)
    try:
        return _train(config, env)
    finally:
        shutdown(env)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms and biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


@contextlib.contextmanager
def _gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
        return
    if is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(sync)
    yield


def _batches(stream, config: TrainConfig, pad_id: int):
    """(batch, position) from (example, position): aligned batches across tokenizers."""
    if config.cross_tokenizer:
        return iter_aligned_batches(
            stream, batch_size=config.batch_size, max_length=config.max_length, pad_id=pad_id
        )
    return iter_batches(
        stream,
        batch_size=config.batch_size,
        max_length=config.max_length,
        pad_id=pad_id,
        packing=config.packing,
    )


def _eval_batches(data: RunData, config: TrainConfig, env: DistEnv, pad_id: int):
    rows = iter_held_out(data.eval_source, data.eval_units, rank=env.rank, world=env.world)
    stream = ((example, DataPosition()) for example in rows)
    for batch, _ in _batches(stream, config, pad_id):
        yield batch


def _train(config: TrainConfig, env: DistEnv) -> Path:
    out = Path(config.output_dir)
    resume = resolve_resume(config)
    if resume is not None:
        check_resumable(resume, config, env)
    torch.manual_seed(config.seed)

    tokenizer = load_tokenizer(config.student)
    vocab_map = None
    if config.cross_tokenizer:
        data, vocab_map = open_aligned_data(config, tokenizer)
    else:
        data = open_data(config, tokenizer)
    client = None
    if config.on_policy_fraction > 0:
        client = TeacherClient(config.teacher_url or "")
        if not config.cross_tokenizer:  # across tokenizers the ids differ by design
            served = f"the teacher at {client.url} serves"
            check_tokenizer(tokenizer, config.student, client.tokenizer(), served)
    ensure_pad_token(tokenizer)
    vocab_size = len(tokenizer)
    model = load_student(str(resume or config.student), vocab_size)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    spec = LossSpec(
        vocab_size=vocab_size,
        loss=config.loss,
        beta=config.beta,
        temperature=config.temperature,
        alpha=config.alpha,
        tail=config.tail,
        chunk_size=config.chunk_size,
        sampled=data.sampled,
    )
    cross = None
    if vocab_map is not None:
        cross = cross_spec(spec, vocab_map, config.alm_weight)
    module = DistillStudent(model, spec, cross)
    module.train()
    wrapped = wrap(module, config.distributed, env, tuple(model._no_split_modules or ()))
    optimizer = build_optimizer(model, config)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_ratio
    )
    onpolicy = _open_onpolicy(config, tokenizer, data, vocab_size, env, client)
    step, position = 0, DataPosition()
    if resume is not None:
        state = load_checkpoint(
            resume, model=model, optimizer=optimizer, scheduler=scheduler, env=env
        )
        step, position = state.step, state.position
        if onpolicy is not None and state.sampler is not None:
            onpolicy.load_state_dict(state.sampler)
    # Every rank, not just the main one: each opens its own files here (keys-rank<r>.txt).
    out.mkdir(parents=True, exist_ok=True)
    if env.main:
        (out / "train_config.json").write_text(config.to_json())

    use_bf16 = env.device.type == "cuda" and config.bf16

    def autocast():
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fsdp = is_fsdp(wrapped)
    # Evaluation and sampling: forwards whose count differs across ranks. Under FSDP they
    # go through the root (which gathers the head) in lockstep; under DDP they skip the
    # wrapper (whose forward is a collective).
    forward_only = wrapped if fsdp else unwrap(wrapped)

    def run_eval(at: int) -> dict[str, float]:
        module.eval()
        if data.eval_units:
            held = _eval_batches(data, config, env, tokenizer.pad_token_id)
        else:  # held-out prompts of a run without data: the student's samples, scored
            held = onpolicy.eval_batches(forward_only, at, lockstep=fsdp)
        result = evaluate(
            lambda batch: forward_only(batch, evaluate=True),
            held,
            env,
            lockstep=fsdp,
            autocast=autocast,
        )
        module.train()
        return result

    batches = None  # an on-policy-only run without data reads none
    if data.source is not None:
        batches = _batches(
            iter_examples(
                data.source,
                data.train_units,
                seed=config.seed,
                rank=env.rank,
                world=env.world,
                window_rows=config.shuffle_window,
                start=position,
            ),
            config,
            tokenizer.pad_token_id,
        )
    log = MetricsLog(out, enabled=env.main, tensorboard=config.tensorboard)
    keys = open(out / f"keys-rank{env.rank}.txt", "a") if config.record_keys else None
    end = config.stop_at_step or config.max_steps
    running = torch.zeros(4, dtype=torch.float64, device=env.device)
    last_log, saved_at, evaluated_at = time.perf_counter(), -1, -1
    step_time = 0.0
    has_eval = bool(data.eval_units) or (onpolicy is not None and bool(onpolicy.held_out))

    def checkpoint() -> Path:
        return save_checkpoint(
            out,
            step=step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            tokenizer=tokenizer,
            position=position,
            config=config,
            env=env,
            sharded=fsdp,
            sampler=None if onpolicy is None else onpolicy.state_dict(),
        )

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        # stderr, like every other progress and summary line: stdout stays free for data.
        console=Console(stderr=True),
        disable=not (env.main and config.progress),
    )

    def report_eval(at: int) -> None:
        """Evaluate, log, and show the figures on the terminal (above the progress bar)."""
        values = run_eval(at)
        log.write(at, values)
        if env.main:
            own = (
                f", reverse KL on the student's samples {values['eval/reverse_kl']:.4f}"
                if "eval/reverse_kl" in values
                else ""
            )
            progress.console.print(
                f"step {at}: held-out KL {values['eval/kl']:.4f} nats/token, top-1 "
                f"agreement {values['eval/top1']:.3f}, CE {values['eval/ce']:.3f}{own}"
            )

    result = out
    with progress:
        task = progress.add_task("train", total=config.max_steps, completed=step, info="")
        while step < end:
            step_start = time.perf_counter()
            if onpolicy is not None and onpolicy.is_on_policy(step):
                # On-policy (GKD): the student's own samples; the data stream stays put.
                micro = [
                    (onpolicy.batch(forward_only, step, i, lockstep=fsdp), position)
                    for i in range(config.grad_accum)
                ]
            else:
                micro = [next(batches) for _ in range(config.grad_accum)]
            position = micro[-1][1]
            local = float(sum(batch.n_targets for batch, _ in micro))
            tokens = all_reduce_sum(torch.tensor([local], device=env.device), env).item()
            scale = env.world / tokens
            for i, (batch, _) in enumerate(micro):
                if keys is not None:
                    keys.writelines(key + "\n" for key in batch.keys)
                with _gradient_sync(wrapped, i == len(micro) - 1):
                    with autocast():
                        loss, stats = wrapped(batch.to(env.device))
                    (loss * scale).backward()
                running += torch.cat(
                    [loss.detach().view(1), stats, loss.new_tensor([batch.n_targets])]
                ).to(running)
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_time += time.perf_counter() - step_start

            if step % config.log_every == 0 or step == end:
                sums = all_reduce_sum(running.clone(), env).tolist()
                now = time.perf_counter()
                count = max(sums[3], 1.0)
                values = {
                    "train/loss": sums[0] / count,
                    "train/kd": sums[1] / count,
                    "train/ce": sums[2] / count,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/tokens_per_s": sums[3] / (now - last_log),
                }
                if onpolicy is not None:
                    values.update(onpolicy_metrics(onpolicy, step_time))
                step_time = 0.0
                log.write(step, values)
                progress.update(task, info=f"loss {values['train/loss']:.4f}")
                running.zero_()
                last_log = now
            progress.update(task, completed=step)
            if has_eval and config.eval_every and step % config.eval_every == 0:
                report_eval(step)
                evaluated_at = step
            if config.save_every and step % config.save_every == 0:
                result = checkpoint()
                saved_at = step

    if step == config.max_steps and has_eval and evaluated_at != step:
        report_eval(step)
    if saved_at != step:
        result = checkpoint()
    if step == config.max_steps:
        state = full_model_state(model)
        if env.main:
            save_model(out, model, state, tokenizer)
        result = out
    log.close()
    if keys is not None:
        keys.close()
    if onpolicy is not None:
        onpolicy.client.close()
    return result


def _open_onpolicy(
    config: TrainConfig,
    tokenizer,
    data: RunData,
    vocab_size: int,
    env: DistEnv,
    client: TeacherClient | None,
):
    """The on-policy step maker when on_policy_fraction > 0 (else None)."""
    if client is None:
        return None
    if config.cross_tokenizer:
        return open_cross_onpolicy(config, tokenizer, data, vocab_size, env.rank, client)
    prompts, held_out = load_prompts(config, tokenizer, data.source, data.train_units)
    return OnPolicy(
        config, tokenizer, prompts, vocab_size, env.rank, client, held_out, world=env.world
    )


def onpolicy_metrics(onpolicy: OnPolicy, step_time: float) -> dict[str, float]:
    """This rank's on-policy cost since the last log: teacher tokens scored and answered
    from the cache, and the steps' time split into sample / score / train."""
    cost = onpolicy.cost
    values = {
        "onpolicy/teacher_tokens": float(cost.scored_tokens),
        "onpolicy/cache_tokens": float(cost.cached_tokens),
        "time/sample_s": cost.sample_s,
        "time/score_s": cost.score_s,
        "time/train_s": step_time - cost.sample_s - cost.score_s,
    }
    onpolicy.cost = type(cost)()
    return values
