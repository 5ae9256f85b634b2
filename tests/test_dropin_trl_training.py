"""End to end: TRL's ServerDistillationTrainer trains a tiny student against `distill serve`.

The trainer generates on-policy completions with the student (seeded), asks the teacher
server for their top-k log-probs through ``VLLMClient.get_sequence_logprobs``, and steps.
A second identical run (same seed, same student) sends the same sequences, so the
teacher must run 0 times: ``distill_teacher_tokens_total`` does not move.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from datasets import Dataset
from service_support import metric, serve_process
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.tiny_models import build_tiny_model

server_distillation = pytest.importorskip("trl.experimental.server_distillation")

pytestmark = pytest.mark.slow
PROMPTS = ["What is 17 + 25?", "How many apples does Tom have?", "Name a quick animal."]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer_dir):
    return build_tiny_model(
        tmp_path_factory.mktemp("student"),
        tokenizer_dir,
        hidden_size=64,
        num_heads=2,
        num_layers=1,
        intermediate_size=128,
        max_position_embeddings=512,
        seed=1,
    )


def train(server_url: str, student_dir, out_dir) -> dict[str, torch.Tensor]:
    """Two optimizer steps of forward-KL distillation on the teacher's top-4; the student's
    weights after them."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = server_distillation.ServerDistillationConfig(
        output_dir=str(out_dir),
        teacher_model_server_url=server_url,
        beta=0.0,
        loss_top_k=4,
        max_completion_length=6,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        seed=0,
        shuffle_dataset=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    trainer = server_distillation.ServerDistillationTrainer(
        model=student, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.fixture(scope="module")
def served(teacher_model, tmp_path_factory):
    """`distill serve` over the tiny teacher, as a user starts it for TRL."""
    data = tmp_path_factory.mktemp("served")
    args = ["--model", str(teacher_model), "--data-root", str(data / "data")]
    args += ["--logprob-codec", "float32", "--max-k", "8", "--default-k", "8"]
    with serve_process(args, data / "serve.log") as (url, _):
        yield url


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served, timeout=60) as c:
        yield c


def test_a_second_identical_run_costs_no_teacher_tokens(served, client, student_dir, tmp_path):
    before = {
        k: v.clone()
        for k, v in AutoModelForCausalLM.from_pretrained(student_dir).state_dict().items()
    }
    first = train(served, student_dir, tmp_path / "run1")
    assert any(not torch.equal(first[k], before[k]) for k in before), "the student trained"
    teacher_tokens = metric(client, "distill_teacher_tokens_total")
    assert teacher_tokens > 0

    second = train(served, student_dir, tmp_path / "run2")
    assert metric(client, "distill_teacher_tokens_total") == teacher_tokens
    assert metric(client, "distill_cache_tokens_total") > 0
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=0, atol=0)
