"""Shared pytest fixtures: a real chat tokenizer trained locally (there is no model hub)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distillcache.shared.tiny_models import train_tokenizer

TOKENIZER_CORPUS = [
    "What is 17 + 25? 17 + 25 = 42. The answer is 42.",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer briefly and exactly.",
    "Distillation trains a small student on a large teacher's outputs.",
] * 20


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE ChatML tokenizer (eos `<|im_end|>`, no pad), trained once per run."""
    out_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TOKENIZER_CORPUS, vocab_size=400, out_dir=out_dir)
    return out_dir


@pytest.fixture
def chat_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """A fresh copy of the trained tokenizer per test, so a test may change it freely."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: tiny models run far faster than on two threads
    that other processes contend for."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
