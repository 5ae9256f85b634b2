"""The training loop end to end on tiny real models and real teacher shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_support import (
    max_weight_difference,
    task_tokenizer,
    tiny_model,
    trained_teacher,
    write_teacher_shards,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.tiny_models import synthetic_task_rows, train_tokenizer
from distillcache.trainer.batching import iter_batches
from distillcache.trainer.checkpoint import latest_checkpoint
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.evaluate import evaluate_model
from distillcache.trainer.loop import train
from distillcache.trainer.sparse_kd import LossSpec
from distillcache.trainer.stream import DataPosition, ShardSource
from distillcache.trainer.student import DistillStudent, TokenizerMismatch

# Tiny matmuls run far faster on one thread than on two contended ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A task tokenizer, a random tiny teacher's shards (k=8) and a tiny student."""
    root = tmp_path_factory.mktemp("loop")
    tokenizer = task_tokenizer(root / "tokenizer")
    rows = list(synthetic_task_rows(80, seed=1))
    teacher = tiny_model(root / "teacher", tokenizer, hidden=64, seed=3)
    shards = write_teacher_shards(teacher, rows, root / "shards", k=8, row_group_tokens=300)
    student = tiny_model(root / "student", tokenizer, hidden=64, seed=5)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "shards": shards,
        "student": student,
        "rows": rows,
    }


def config(world, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(world["shards"]),
        student=str(world["student"]),
        output_dir=str(out),
        batch_size=6,
        grad_accum=2,
        max_steps=8,
        lr=3e-3,
        warmup_steps=2,
        min_lr_ratio=0.1,
        weight_decay=0.01,
        shuffle_window=10,
        eval_fraction=0.2,
        chunk_size=16,
        log_every=1,
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resumed_run_matches_uninterrupted_run(world, tmp_path, packing):
    # 8 steps x 2 x 6 rows cross the epoch boundary (about 64 training rows) and several
    # shuffle windows, so the position has to carry epoch, window and row exactly.
    straight = train(config(world, tmp_path / "straight", packing=packing, max_length=64))
    stopped = train(
        config(world, tmp_path / "resumed", packing=packing, max_length=64, stop_at_step=3)
    )
    assert stopped == tmp_path / "resumed" / "checkpoint-3"
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train(
        config(world, tmp_path / "resumed", packing=packing, max_length=64, resume="auto")
    )
    assert max_weight_difference(straight, resumed) <= 1e-6
    history = {r["step"]: r for r in metrics(tmp_path / "straight") if "train/loss" in r}
    after = {r["step"]: r for r in metrics(tmp_path / "resumed") if "train/loss" in r}
    for step in range(1, 9):
        assert after[step]["train/loss"] == pytest.approx(history[step]["train/loss"], rel=1e-5)


def test_resume_refuses_a_changed_data_order(world, tmp_path):
    train(config(world, tmp_path, max_steps=2, stop_at_step=1))
    with pytest.raises(ValueError, match="seed"):
        train(config(world, tmp_path, max_steps=2, resume="auto", seed=1))


def test_checkpoints_load_with_from_pretrained(world, tmp_path):
    out = train(config(world, tmp_path, max_steps=4, save_every=2))
    assert out == tmp_path
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    for directory in (tmp_path, tmp_path / "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.vocab_size >= 1
    assert {p.name for p in (tmp_path / "checkpoint-2").iterdir()} >= {
        "model.safetensors",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rank-0.pt",
    }
    evals = [r for r in metrics(tmp_path) if "eval/kl" in r]
    assert evals[-1]["step"] == 4 and evals[-1]["eval/tokens"] > 0


def test_a_teacher_evaluated_on_its_own_shards_is_at_zero_kl_unlike_a_student(world):
    teacher = evaluate_model(world["root"] / "teacher", world["shards"], chunk_size=32)
    student = evaluate_model(world["student"], world["shards"], chunk_size=32)
    # What is left is the cost of storing log-probs in one byte (cbrt-u8), ~1e-5 nats.
    assert 0 <= teacher["eval/kl"] < 1e-3
    assert student["eval/kl"] > 10 * teacher["eval/kl"]
    assert teacher["eval/tokens"] == student["eval/tokens"] > 0


def test_kd_lowers_the_training_loss(world, tmp_path):
    train(config(world, tmp_path, max_steps=12, grad_accum=1, log_every=1, eval_fraction=0.0))
    losses = [r["train/loss"] for r in metrics(tmp_path)]
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_changes_memory_not_results(world, tmp_path):
    plain = train(config(world, tmp_path / "plain", max_steps=2, eval_fraction=0.0))
    recomputed = train(
        config(
            world, tmp_path / "ckpt", max_steps=2, eval_fraction=0.0, gradient_checkpointing=True
        )
    )
    assert max_weight_difference(plain, recomputed) <= 1e-6


def test_student_with_padded_logit_width_trains_and_never_touches_the_padding(world, tmp_path):
    vocab = len(json.loads((world["tokenizer"] / "tokenizer.json").read_text())["model"]["vocab"])
    padded = tiny_model(tmp_path / "padded", world["tokenizer"], seed=5, padded_vocab=vocab + 61)
    before = load_file(padded / "model.safetensors")
    out = train(config(world, tmp_path / "run", student=str(padded), max_steps=3, weight_decay=0))
    after = load_file(out / "model.safetensors")
    name = "model.embed_tokens.weight"
    width = before[name].shape[0]
    assert after[name].shape[0] == width and width > vocab
    tokens = AutoModelForCausalLM.from_pretrained(out).config.vocab_size
    assert tokens == width
    size = width - 61
    assert torch.equal(after[name][size:], before[name][size:])
    assert not torch.equal(after[name][:size], before[name][:size])


def test_student_with_another_tokenizer_is_refused_naming_the_cross_tokenizer_mode(world, tmp_path):
    train_tokenizer(["a completely different corpus of words"] * 5, 300, tmp_path / "t")
    student = tiny_model(tmp_path / "other", tmp_path / "t")
    with pytest.raises(TokenizerMismatch, match="cross-tokenizer"):
        train(config(world, tmp_path / "run", student=str(student)))


def seed_file(world, path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in world["rows"]))
    return path


def test_sft_on_a_seed_jsonl_file_trains_with_eos_as_padding(world, tmp_path):
    data = seed_file(world, tmp_path / "seed.jsonl")
    out = train(
        config(world, tmp_path / "run", data=str(data), loss="sft", max_steps=10, grad_accum=1)
    )
    records = metrics(out)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0]
    final = [r for r in records if "eval/ce" in r][-1]
    assert final["eval/ce"] > 0 and final["eval/kl"] == 0.0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_kd_losses_on_a_seed_file_are_refused(world, tmp_path):
    data = seed_file(world, tmp_path / "seed.jsonl")
    with pytest.raises(ValueError, match="only --loss sft"):
        train(config(world, tmp_path / "run", data=str(data)))


def first_examples(world, n=6):
    source = ShardSource(world["shards"])
    examples = source.load(source.units()[0])[:n]
    return [(e, DataPosition(0, 0, i + 1)) for i, e in enumerate(examples)]


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd", "sft"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(world, loss, tail):
    model = AutoModelForCausalLM.from_pretrained(world["student"])
    spec = LossSpec(
        vocab_size=model.config.vocab_size,
        loss=loss,
        tail=tail,
        temperature=2.0,
        alpha=0.1,
        chunk_size=7,
    )
    student = DistillStudent(model, spec)
    results = []
    for packing, batch_size in ((False, 6), (True, 1)):
        batches = list(
            iter_batches(
                first_examples(world),
                batch_size=batch_size,
                max_length=512,
                pad_id=0,
                packing=packing,
            )
        )
        assert len(batches) == 1
        model.zero_grad()
        total, _ = student(batches[0][0])
        total.backward()
        assert torch.isfinite(total)
        results.append((total.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_kd_from_a_trained_teacher_beats_sft_on_held_out_kl(tmp_path):
    """A teacher fitted to the task for about a minute; KD and SFT students, same steps."""
    rows = list(synthetic_task_rows(600, seed=2))
    tokenizer = task_tokenizer(tmp_path / "tokenizer")
    teacher = trained_teacher(tmp_path / "teacher", tokenizer, rows, steps=300)
    shards = write_teacher_shards(
        teacher, rows, tmp_path / "shards", k=16, generate=True, row_group_tokens=2000
    )
    student = tiny_model(tmp_path / "student", tokenizer, hidden=64, seed=11)
    results = {}
    for loss in ("forward_kl", "sft"):
        out = tmp_path / loss
        train(
            TrainConfig(
                data=str(shards),
                student=str(student),
                output_dir=str(out),
                loss=loss,
                batch_size=16,
                max_steps=60,
                lr=3e-3,
                warmup_steps=5,
                eval_fraction=0.2,
                chunk_size=256,
                progress=False,
                tensorboard=False,
            )
        )
        results[loss] = [r for r in metrics(out) if "eval/kl" in r][-1]
    kd, sft = results["forward_kl"], results["sft"]
    assert kd["eval/kl"] < sft["eval/kl"], (kd, sft)
