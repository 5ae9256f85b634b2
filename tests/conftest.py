"""Shared pytest fixtures: a real chat tokenizer trained locally (there is no model hub), a
tiny teacher, and a real teacher server per test module with its client."""

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import torch
from service_support import build_teacher, thread_server
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distillcache.services.teacher.settings import TeacherSettings
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


class Server(NamedTuple):
    """A running teacher service: its URL, data root and settings."""

    url: str
    data: Path
    settings: TeacherSettings


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The tiny teacher every service test serves (built once per run)."""
    return build_teacher(tmp_path_factory.mktemp("teacher"), tokenizer_dir)


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, teacher_model: Path
) -> Iterator[Server]:
    """A real uvicorn server in a thread over the tiny teacher, ready, for one test module.

    The module's ``SERVER_SETTINGS`` dict sets its TeacherSettings (beyond model and
    data root)."""
    data = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "data"
    settings = TeacherSettings(
        model=str(teacher_model),
        data_root=data,
        **getattr(request.module, "SERVER_SETTINGS", {}),
    )
    with thread_server(settings) as url:
        yield Server(url, data, settings)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """An HTTP client of the module's server, with its bearer token when it has one."""
    token = server.settings.token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as c:
        yield c


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs of a given size (``"512k"``, ``"4m"``): a disk that really fills up.
    Skips the test where mounting is not allowed (not root); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
