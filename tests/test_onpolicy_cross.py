"""On-policy (GKD) steps across tokenizers, through a real teacher server.

A tiny teacher on SmolLM2's real tokenizer is served for real (uvicorn, transformers
backend); students are tiny models on SmolLM2's tokenizer (the reduction to one
tokenizer) and on GPT-2's (a real pair). The learning check's reference is independent of
the service and of the aligned loss (``sequence_kl.sequence_reverse_kl``).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from sequence_kl import sequence_reverse_kl
from service_support import thread_server
from trainer_support import max_weight_difference, write_teacher_shards
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.inputs import ensure_pad_token
from distillcache.shared.keys import tokenizer_hash
from distillcache.shared.model_source import ModelSourceError, real_tokenizer
from distillcache.shared.reader import ShardDataset
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
)
from distillcache.trainer.aligned_data import Retokenizer, open_aligned_data
from distillcache.trainer.batching import Batch
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.cross_tokenizer import cross_spec
from distillcache.trainer.data import open_data
from distillcache.trainer.loop import train
from distillcache.trainer.onpolicy import OnPolicy, load_prompts
from distillcache.trainer.onpolicy_cross import open_cross_onpolicy
from distillcache.trainer.sparse_kd import LossSpec
from distillcache.trainer.student import DistillStudent, load_tokenizer
from distillcache.trainer.token_alignment import TokenBytes, VocabMap

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CACHE = Path(os.environ.get("DISTILLCACHE_CACHE", Path(__file__).parents[1] / ".cache"))


def real(name: str) -> Path:
    try:
        return real_tokenizer(name, CACHE)
    except ModelSourceError as error:
        pytest.skip(f"the {name} tokenizer cannot be built here: {error}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A teacher on SmolLM2's tokenizer behind a real server, its shards (the prompts, and
    the off-policy steps), and students on SmolLM2's and GPT-2's tokenizers."""
    root = tmp_path_factory.mktemp("xtok-onpolicy")
    smol, gpt2 = real("smollm2"), real("gpt2")
    teacher = build_tiny_model(root / "teacher", smol, hidden_size=64, num_heads=2, seed=7)
    rows = list(synthetic_task_rows(40, seed=2))
    shards = write_teacher_shards(teacher, rows, root / "shards", k=8, row_group_tokens=400)
    settings = TeacherSettings(
        model=str(teacher), data_root=root / "served", max_k=64, default_k=8, flush_rows=1
    )
    with thread_server(settings) as url:
        yield {
            "root": root,
            "teacher": teacher,
            "shards": shards,
            "smol_student": build_tiny_model(
                root / "smol-student", smol, hidden_size=64, num_heads=2, seed=5
            ),
            "gpt2_student": build_tiny_model(
                root / "gpt2-student", gpt2, hidden_size=64, num_heads=2, seed=11
            ),
            "url": url,
            "served": root / "served",
        }


def config(world, out: Path, student: str = "gpt2_student", **overrides) -> TrainConfig:
    settings = dict(
        data=str(world["shards"]),
        student=str(world[student]),
        output_dir=str(out),
        loss="reverse_kl",
        cross_tokenizer=True,
        batch_size=4,
        max_steps=4,
        lr=3e-3,
        warmup_steps=1,
        max_length=128,
        chunk_size=32,
        log_every=1,
        progress=False,
        tensorboard=False,
        on_policy_fraction=1.0,
        teacher_url=world["url"],
        sample_max_new_tokens=16,
        vocab_map_dir=str(world["root"] / "maps"),
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_sample_reaches_the_teacher_as_its_text_in_the_teachers_ids(tmp_path):
    smol = AutoTokenizer.from_pretrained(real("smollm2"))
    gpt2 = AutoTokenizer.from_pretrained(real("gpt2"))
    retok = Retokenizer(smol, gpt2, VocabMap.load_or_build(smol, gpt2, tmp_path))
    text = "Tom has 12345 apples: 12345 + 1 = 12346. Ünïcode 🎉"
    body = gpt2.encode(text, add_special_tokens=False)
    stopped = retok.to_teacher([*body, gpt2.eos_token_id])
    assert stopped.tolist() == [*smol.encode(text, add_special_tokens=False), smol.eos_token_id]
    cut = retok.to_teacher(body)  # stopped by sample_max_new_tokens: no eos
    assert cut.tolist() == stopped[:-1].tolist()
    # A sampled byte token that leaves a character unfinished ("🎉" is four bytes): the
    # text stops before it, and so does the teacher, with no eos the student did not
    # write right after the text.
    partial = TokenBytes(gpt2).table.index("🎉".encode()[:1])
    unfinished = retok.to_teacher([*body, partial, gpt2.eos_token_id])
    assert unfinished.tolist() == cut.tolist()
    assert retok.to_teacher([gpt2.eos_token_id]).tolist() == [smol.eos_token_id]
    assert retok.to_teacher([partial]).tolist() == []
    # The two tokenizations' chunks cover the whole text, the eos pair included.
    row = retok.pair(stopped, np.array([*body, gpt2.eos_token_id]), len(text.encode()))
    assert row.chunks[-1].tolist() == [len(stopped) - 1, len(stopped), len(body), len(body) + 1]
    assert (row.chunks[1:, 0] == row.chunks[:-1, 1]).all() and row.chunks[0, 0] == 0
    assert (row.chunks[:, 1] - row.chunks[:, 0] != 1).any(), "the numbers split differently"


@pytest.fixture(scope="module")
def float32_url(world):
    """The same teacher served with the float32 log-prob codec: its top-k reach the
    trainer unrounded, so 1 - sum(top-k) is the tail it recorded."""
    settings = TeacherSettings(
        model=str(world["teacher"]),
        data_root=world["root"] / "served-f32",
        max_k=64,
        default_k=8,
        logprob_codec="float32",
        flush_rows=1,
    )
    with thread_server(settings) as url:
        yield url


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("score_top", [0, 8])
def test_one_tokenizer_on_both_sides_gives_the_same_on_policy_loss_and_gradients(
    world, float32_url, tmp_path, loss, score_top
):
    """--cross-tokenizer with SmolLM2's tokenizer on both sides against a same-tokenizer
    on-policy step of the same run: the same samples and score_ids, every chunk 1:1, the
    same loss and gradients.

    With score_ids (8) the reference is the same-tokenizer on-policy loss itself
    (``union_head_loss``), from a teacher served with the float32 codec. Under a rounding
    codec the two differ slightly (about 3e-4 of the loss with cbrt-u8): the union takes
    the teacher's rest mass as 1 - sum of the decoded log-probs, the chunk loss the
    ``tail_logprob`` recorded before rounding, as it does for cached rows. Without
    score_ids (0) the reference is the same-tokenizer loss of those scored rows read as
    cached ones (``chunked_head_loss``), which uses that tail too, served with cbrt-u8."""
    url = float32_url if score_top else world["url"]
    settings = dict(
        student="smol_student",
        loss=loss,
        temperature=2.0,
        alpha=0.1,
        seed=3,
        score_top=score_top,
        teacher_url=url,
    )
    cross_config = config(world, tmp_path / f"cross-{loss}-{score_top}", **settings)
    plain_config = config(world, tmp_path / "plain", cross_tokenizer=False, **settings)
    tokenizer = load_tokenizer(cross_config.student)
    data, vocab_map = open_aligned_data(cross_config, tokenizer)
    ensure_pad_token(tokenizer)
    vocab = len(tokenizer)
    cross = open_cross_onpolicy(cross_config, tokenizer, data, vocab, rank=0)
    assert cross.one_vocabulary
    plain_tokenizer = load_tokenizer(plain_config.student)
    plain_data = open_data(plain_config, plain_tokenizer)
    ensure_pad_token(plain_tokenizer)
    plain_prompts, _ = load_prompts(
        plain_config, plain_tokenizer, plain_data.source, plain_data.train_units
    )
    assert [p.tolist() for p in cross.prompts] == [p.tolist() for p in plain_prompts]
    plain = OnPolicy(plain_config, plain_tokenizer, plain_prompts, vocab, rank=0)

    model = AutoModelForCausalLM.from_pretrained(world["smol_student"])
    spec = LossSpec(
        vocab_size=vocab, loss=loss, temperature=2.0, alpha=0.1, chunk_size=cross_config.chunk_size
    )
    student = DistillStudent(model, spec, cross_spec(spec, vocab_map))
    for step in (0, 1):
        aligned, same = cross.batch(student, step, 0), plain.batch(student, step, 0)
        assert torch.equal(aligned.input_ids, same.input_ids), "the same samples"
        assert aligned.chunk_first.all() and aligned.aligned.all(), "every chunk 1:1"
        assert torch.equal(aligned.score_ids, same.score_ids), "the same score_ids"
        assert aligned.score_ids.shape[1] == score_top
        if not score_top:
            same = Batch(**{f.name: getattr(same, f.name) for f in fields(Batch)})
        results = []
        for batch in (aligned, same):
            model.zero_grad()
            total, stats = student(batch)
            total.backward()
            results.append((total.detach(), stats, model.lm_head.weight.grad.clone()))
        (a_loss, a_stats, a_grad), (b_loss, b_stats, b_grad) = results
        assert abs(a_loss.item() - b_loss.item()) <= 1e-6 * max(1.0, abs(b_loss.item()))
        torch.testing.assert_close(a_stats, b_stats, rtol=1e-6, atol=1e-5)
        assert (a_grad - b_grad).abs().max().item() <= 1e-6 * max(1.0, b_grad.abs().max().item())
    # The cross run's samples are stored in its dataset, in the teacher's (here: the
    # same) ids.
    served = world["root"] / ("served-f32" if score_top else "served")
    stored = list(ShardDataset(served / f"onpolicy-cross-{loss}-{score_top}").iter_records())
    assert len(stored) == 8 and {r.meta["step"] for r in stored} == {0, 1}


def test_a_student_of_another_tokenizer_trains_on_policy_through_the_served_teacher(
    world, tmp_path
):
    """GPT-2-tokenizer student, SmolLM2-tokenizer teacher, L = 1: the run finishes with
    finite losses and every sample is stored once, in the teacher's tokenization, with the
    meta of its step and row; the teacher's tokens scored are exactly the stored ones."""
    steps = 6
    out = train(config(world, tmp_path / "run", max_steps=steps))
    data = ShardDataset(world["served"] / "onpolicy-run")
    teacher_tokenizer = AutoTokenizer.from_pretrained(world["teacher"])
    assert data.info.tokenizer_hash == tokenizer_hash(teacher_tokenizer)
    rows = list(data.iter_records())
    assert sorted((r.meta["step"], r.meta["row"]) for r in rows) == [
        (s, i) for s in range(steps) for i in range(4)
    ]
    logged = [r for r in metrics(out) if "train/loss" in r]
    assert len(logged) == steps and all(np.isfinite(r["train/loss"]) for r in logged)
    scored = sum(r["onpolicy/teacher_tokens"] for r in logged)
    assert scored == sum(len(r.completion_ids) for r in rows), "each sample scored once"
    # The stored completions are the teacher's own tokenization of a text (which ids of
    # the student's vocabulary would not be).
    spell = TokenBytes(teacher_tokenizer)
    eos = teacher_tokenizer.eos_token_id
    for r in rows:
        body = [t for t in r.completion_ids.tolist() if t != eos]
        text = spell.text_bytes(body).decode("utf-8")
        assert teacher_tokenizer.encode(text, add_special_tokens=False) == body


@pytest.mark.slow
def test_on_policy_across_tokenizers_brings_the_student_closer_to_the_teacher(
    tmp_path, record_property
):
    """A teacher fitted to the arithmetic task (SmolLM2's tokenizer, served for real), a
    GPT-2-tokenizer student, L = 1, forward KL, 60 steps: the sequence-level reverse KL
    on the student's own samples of 24 held-out prompts falls by more than a tenth.
    (Reverse KL as the loss does not get there: docs/trainer.md, "On-policy across
    tokenizers".)"""
    teacher = build_tiny_model(
        tmp_path / "teacher", real("smollm2"), hidden_size=64, num_heads=2, seed=7
    )
    rows = list(synthetic_task_rows(200, seed=2))
    train_tiny_model(teacher, chat_texts(rows, AutoTokenizer.from_pretrained(teacher)), steps=60)
    shards = write_teacher_shards(teacher, rows[:40], tmp_path / "shards", k=8)
    student = build_tiny_model(
        tmp_path / "student", real("gpt2"), hidden_size=64, num_heads=2, seed=11
    )
    settings = TeacherSettings(model=str(teacher), data_root=tmp_path / "served", max_k=64)
    with thread_server(settings) as url:
        world = {"root": tmp_path, "shards": shards, "student": student, "url": url}
        out = train(
            config(world, tmp_path / "run", "student", loss="forward_kl", lr=1e-2, max_steps=60)
        )
    questions = [r["question"] for r in synthetic_task_rows(24, seed=99)]
    before = sequence_reverse_kl(student, teacher, questions)
    after = sequence_reverse_kl(out, teacher, questions)
    record_property("sequence_reverse_kl", {"start": before, "end": after})
    assert after < 0.9 * before, (before, after)


def test_cross_tokenizer_on_policy_run_resumes_exactly(world, tmp_path):
    """L = 0.5 mixes on-policy steps and cached (aligned) ones; stopped after two steps
    and resumed, the run ends with the weights of a straight one."""
    run = dict(on_policy_fraction=0.5, seed=1)
    straight = train(config(world, tmp_path / "straight", **run))
    train(config(world, tmp_path / "resumed", stop_at_step=2, **run))
    resumed = train(config(world, tmp_path / "resumed", resume="auto", **run))
    assert max_weight_difference(straight, resumed) <= 1e-6
    scored = [r["onpolicy/teacher_tokens"] for r in metrics(straight) if "train/loss" in r]
    assert 0 < sum(t > 0 for t in scored) < 4, "0.5 draws both kinds of step"


def test_a_served_teacher_of_another_tokenizer_is_refused_in_one_line(world, tmp_path):
    """The run aligns with the dataset's teacher tokenizer; a server whose answers carry
    another tokenizer's hash (here a model on GPT-2's) stops it at the first answer."""
    settings = TeacherSettings(
        model=str(world["gpt2_student"]), data_root=tmp_path / "served", max_k=64, default_k=8
    )
    with thread_server(settings) as url:
        with pytest.raises(ValueError, match=r"^the teacher at .* uses the tokenizer .*--teacher-"):
            train(config(world, tmp_path / "run", teacher_url=url, max_steps=1))
