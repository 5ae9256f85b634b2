"""Loading batch-job input rows from JSONL, JSONL.zst and Parquet, and rendering them."""

import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillcache.shared.inputs import (
    InputError,
    InputRow,
    ensure_pad_token,
    iter_input_rows,
    load_input_rows,
    plain_prompt_text,
    render_completion,
    render_prompt,
)

SUFFIXES = [".jsonl", ".json", ".jsonl.zst", ".parquet"]

SEED_ROW = {"id": "q-1", "question": "What is 2 + 3?", "teacher_solution": "2 + 3 = 5."}
CHAT_ROW = {
    "id": "q-2",
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a fox."},
    ],
}
PROMPT_ROW = {"id": "q-3", "prompt": "The quick brown fox", "completion": " jumps."}


def jsonl_bytes(records: list, ensure_ascii: bool = True) -> bytes:
    lines = [json.dumps(record, ensure_ascii=ensure_ascii) for record in records]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def write_rows(path: Path, records: list[dict], ensure_ascii: bool = True) -> Path:
    """Write `records` in the format `path`'s suffix names, as a user's tool would."""
    if path.name.endswith(".parquet"):
        # One column per field of any row (null where a row lacks it), as pandas and
        # datasets write mixed rows; small row groups, so reading crosses their boundaries.
        fields = dict.fromkeys(key for record in records for key in record)
        columns = {field: [record.get(field) for record in records] for field in fields}
        pq.write_table(pa.table(columns), path, row_group_size=2)
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(records, ensure_ascii)))
    else:
        path.write_bytes(jsonl_bytes(records, ensure_ascii))
    return path


def write_zst_lines(path: Path, text: str) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode("utf-8")))
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_three_row_shapes_load_from_every_format(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"in{suffix}", [SEED_ROW, CHAT_ROW, PROMPT_ROW])

    rows, errors = load_input_rows(path)

    assert errors == []
    assert rows == [
        InputRow(
            source=str(path),
            line=1,
            messages=[{"role": "user", "content": "What is 2 + 3?"}],
            completion="2 + 3 = 5.",
            meta={"id": "q-1"},
        ),
        InputRow(
            source=str(path),
            line=2,
            messages=CHAT_ROW["messages"],
            completion=None,
            meta={"id": "q-2"},
        ),
        InputRow(
            source=str(path),
            line=3,
            messages=[{"role": "user", "content": "The quick brown fox"}],
            completion=" jumps.",
            meta={"id": "q-3"},
        ),
    ]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_fields_other_than_the_prompt_and_completion_are_kept_as_meta(
    tmp_path: Path, suffix: str
) -> None:
    record = {"question": "Why?", "id": 7, "source": "gsm8k", "tags": ["a", "b"], "level": 2.5}
    path = write_rows(tmp_path / f"in{suffix}", [record])

    [row], _ = load_input_rows(path)

    assert row.meta == {"id": 7, "source": "gsm8k", "tags": ["a", "b"], "level": 2.5}
    assert row.completion is None


def test_a_null_field_counts_as_absent(tmp_path: Path) -> None:
    record = {"prompt": "Hi", "question": None, "completion": None, "note": None, "id": 1}
    path = write_rows(tmp_path / "in.jsonl", [record])

    [row], errors = load_input_rows(path)

    assert errors == []
    assert row.completion is None
    assert row.meta == {"id": 1}


def test_a_seed_row_without_teacher_solution_is_generated_not_scored(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", [{"question": "What is 2 + 3?"}])

    [row], _ = load_input_rows(path)

    assert row.completion is None
    assert row.messages == [{"role": "user", "content": "What is 2 + 3?"}]


def test_teacher_solution_is_only_the_completion_of_a_seed_row(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", [{"prompt": "Hi", "teacher_solution": "Hello"}])

    [row], _ = load_input_rows(path)

    assert row.completion is None
    assert row.meta == {"teacher_solution": "Hello"}


def test_a_chat_row_may_carry_a_completion_to_score(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", [{**CHAT_ROW, "completion": "Reynard."}])

    [row], _ = load_input_rows(path)

    assert row.completion == "Reynard."
    assert row.messages == CHAT_ROW["messages"]


def test_malformed_line_is_reported_with_its_line_number_and_the_rest_loads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(PROMPT_ROW),
                '{"prompt": "unterminated',
                "[1, 2]",
                json.dumps({"id": "no-prompt"}),
                json.dumps({"prompt": 42}),
                "",
                "   ",
                json.dumps(SEED_ROW),
            ]
        )
        + "\n"
    )

    rows, errors = load_input_rows(path)

    assert [row.line for row in rows] == [1, 8]
    assert [row.meta["id"] for row in rows] == ["q-3", "q-1"]
    assert [str(error) for error in errors] == [
        f"{path}:2: invalid JSON: Unterminated string starting at (column 12)",
        f"{path}:3: row must be a JSON object, got array",
        f'{path}:4: row has no prompt: give one of "messages", "prompt" or "question"',
        f'{path}:5: field "prompt" must be a string, got number',
    ]


def test_error_names_file_line_and_field_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    turns = [("user", "Hi"), ("assistant", "Hello"), ("bot", "Who asked?")]
    bad = {"messages": [{"role": role, "content": content} for role, content in turns]}
    write_rows(Path("data/in.jsonl"), [PROMPT_ROW] * 16 + [bad])

    rows, errors = load_input_rows("data/in.jsonl")

    assert len(rows) == 16
    assert [str(error) for error in errors] == [
        'data/in.jsonl:17: field "messages[2].role" must be one of '
        'system/user/assistant/tool, got "bot"'
    ]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "   "}, 'field "prompt" must not be empty'),
        ({"question": ""}, 'field "question" must not be empty'),
        ({"question": ["q"]}, 'field "question" must be a string, got array'),
        ({"messages": "hi"}, 'field "messages" must be an array, got string'),
        ({"messages": []}, 'field "messages" must not be empty'),
        (
            {"messages": ["hi"]},
            'field "messages[0]" must be an object with "role" and "content", got string',
        ),
        ({"messages": [{"content": "hi"}]}, 'field "messages[0].role" is missing'),
        ({"messages": [{"role": "user"}]}, 'field "messages[0].content" is missing'),
        (
            {"messages": [{"role": "user", "content": {"text": "hi"}}]},
            'field "messages[0].content" must be a string, got object',
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
            'field "messages[0].name" is not supported: a message has only "role" and "content"',
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            'field "messages[1].role": the prompt ends with an assistant turn, leaving the '
            'teacher nothing to answer; put an answer to score in "completion"',
        ),
        ({"prompt": "hi", "completion": 3}, 'field "completion" must be a string, got number'),
        ({"prompt": "hi", "completion": ""}, 'field "completion" must not be empty'),
        (
            {"question": "q", "teacher_solution": "a", "completion": "b"},
            'row has "completion" and "teacher_solution": give one',
        ),
        (
            {"prompt": "hi", "question": "q"},
            'row has "prompt" and "question": give exactly one prompt field',
        ),
        ("just a string", "row must be a JSON object, got string"),
        (None, "row must be a JSON object, got null"),
    ],
)
def test_each_kind_of_bad_row_is_reported_precisely(
    tmp_path: Path, record: object, message: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes([PROMPT_ROW, record, PROMPT_ROW]))

    rows, errors = load_input_rows(path)

    assert errors == [InputError(str(path), 2, message)]
    assert [row.line for row in rows] == [1, 3]


def test_a_line_of_invalid_utf8_is_reported_and_the_rest_loads(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n{"prompt": "fine"}\n')

    rows, errors = load_input_rows(path)

    assert [row.messages[0]["content"] for row in rows] == ["ok", "fine"]
    assert errors == [InputError(str(path), 2, "line is not valid UTF-8 (byte 13 of the line)")]


def test_crlf_line_endings_and_a_byte_order_mark_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "one"}\r\n\r\n{"prompt": "two"}\r\n')

    rows, errors = load_input_rows(path)

    assert errors == []
    assert [(row.line, row.messages[0]["content"]) for row in rows] == [(1, "one"), (3, "two")]


def test_parquet_errors_are_numbered_by_row(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "in.parquet",
        [{"prompt": "a"}, {"prompt": "b"}, {"prompt": " "}, {"prompt": "d"}, {"prompt": None}],
    )

    rows, errors = load_input_rows(path)

    assert [row.line for row in rows] == [1, 2, 4]
    assert [str(error) for error in errors] == [
        f'{path}:3: field "prompt" must not be empty',
        f'{path}:5: row has no prompt: give one of "messages", "prompt" or "question"',
    ]


def test_zst_input_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    # 16 MiB of JSON lines, mostly random hex so they do not compress to nothing: lines
    # cross every decompressed chunk boundary, and reading must not hold the file.
    records = [{"id": index, "prompt": os.urandom(512).hex()} for index in range(16_000)]
    path = write_rows(tmp_path / "big.jsonl.zst", records)
    del records

    tracemalloc.start()
    count = 0
    for item in iter_input_rows(path):
        assert isinstance(item, InputRow)
        assert item.meta["id"] == count and len(item.messages[0]["content"]) == 1024
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert count == 16_000
    assert peak < 4 * 1024 * 1024


def test_zst_file_of_concatenated_frames_reads_every_frame(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(
        compressor.compress(jsonl_bytes([{"prompt": "first"}]))
        + compressor.compress(jsonl_bytes([{"prompt": "second"}]))
    )

    rows, errors = load_input_rows(path)

    assert errors == []
    assert [row.messages[0]["content"] for row in rows] == ["first", "second"]


def test_truncated_zst_file_raises_naming_the_file(tmp_path: Path) -> None:
    records = [{"prompt": os.urandom(64).hex()} for _ in range(5000)]
    whole = write_rows(tmp_path / "whole.jsonl.zst", records).read_bytes()
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) * 2 // 3])

    with pytest.raises(ValueError, match=r"cut\.jsonl\.zst: zstd data ends inside a frame"):
        list(iter_input_rows(path))


def test_corrupt_zst_file_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(b"this is not zstd at all\n")

    with pytest.raises(ValueError, match=r"in\.jsonl\.zst: corrupt zstd data"):
        list(iter_input_rows(path))


def test_corrupt_parquet_file_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    path.write_bytes(b"not parquet")

    with pytest.raises(ValueError, match=r"in\.parquet: cannot read Parquet"):
        list(iter_input_rows(path))


def test_unknown_suffix_is_refused_naming_the_file_and_the_accepted_suffixes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.csv"
    path.write_text("prompt\nhi\n")

    with pytest.raises(ValueError) as raised:
        iter_input_rows(path)

    assert str(raised.value) == (
        f"{path}: unknown input format; accepted suffixes: .jsonl, .json, .jsonl.zst, .parquet"
    )


non_blank_text = st.text(min_size=1).filter(lambda text: text.strip() != "")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(non_blank_text, min_size=1, max_size=5),
    completion=non_blank_text,
    suffix=st.sampled_from(SUFFIXES),
    ensure_ascii=st.booleans(),
)
def test_any_unicode_prompt_round_trips_through_every_format(
    tmp_path: Path, prompts: list[str], completion: str, suffix: str, ensure_ascii: bool
) -> None:
    records = [{"prompt": prompt, "completion": completion} for prompt in prompts]
    path = write_rows(tmp_path / f"in{suffix}", records, ensure_ascii)

    rows, errors = load_input_rows(path)

    assert errors == []
    assert [row.messages for row in rows] == [
        [{"role": "user", "content": prompt}] for prompt in prompts
    ]
    assert {row.completion for row in rows} == {completion}


def test_chat_template_rendering_equals_apply_chat_template(chat_tokenizer) -> None:
    row = InputRow("in.jsonl", 1, CHAT_ROW["messages"], None, {})
    text = chat_tokenizer.apply_chat_template(
        row.messages, add_generation_prompt=True, tokenize=False
    )

    ids = render_prompt(chat_tokenizer, row.messages)

    assert ids == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.decode(ids) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nName a fox.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_prompt_and_question_rows_render_as_one_user_turn(tmp_path: Path, chat_tokenizer) -> None:
    path = write_rows(tmp_path / "in.jsonl", [{"prompt": "Hi there"}, {"question": "Hi there"}])
    [prompt_row, question_row], _ = load_input_rows(path)

    assert render_prompt(chat_tokenizer, prompt_row.messages) == render_prompt(
        chat_tokenizer, question_row.messages
    )
    assert chat_tokenizer.decode(render_prompt(chat_tokenizer, prompt_row.messages)) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_without_chat_template_a_single_user_turn_renders_as_its_plain_text(
    chat_tokenizer,
) -> None:
    chat_tokenizer.chat_template = None
    row = InputRow("in.jsonl", 1, [{"role": "user", "content": "The quick brown fox"}], None, {})

    ids = render_prompt(chat_tokenizer, row.messages)

    assert ids == chat_tokenizer("The quick brown fox")["input_ids"]
    assert chat_tokenizer.decode(ids) == "The quick brown fox"


def test_without_chat_template_a_conversation_renders_with_role_prefixes(chat_tokenizer) -> None:
    chat_tokenizer.chat_template = None
    row = InputRow("in.jsonl", 1, CHAT_ROW["messages"], None, {})

    ids = render_prompt(chat_tokenizer, row.messages)

    assert plain_prompt_text(row.messages) == (
        "System: Answer briefly.\n\nUser: Name a fox.\n\nAssistant:"
    )
    assert chat_tokenizer.decode(ids) == plain_prompt_text(row.messages)


def test_completion_renders_as_its_tokens_followed_by_eos(chat_tokenizer) -> None:
    row = InputRow("in.jsonl", 1, [{"role": "user", "content": "Sum?"}], "2 + 3 = 5.", {})

    ids = render_completion(chat_tokenizer, row.completion)

    assert (
        ids[-1] == chat_tokenizer.eos_token_id == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert chat_tokenizer.decode(ids[:-1]) == "2 + 3 = 5."
    assert chat_tokenizer.eos_token_id not in ids[:-1]


def test_rendering_a_completion_without_an_eos_token_is_refused(chat_tokenizer) -> None:
    chat_tokenizer.eos_token = None

    with pytest.raises(ValueError, match="no eos token"):
        render_completion(chat_tokenizer, "2 + 3 = 5.")


def test_pad_token_falls_back_to_eos(chat_tokenizer) -> None:
    assert chat_tokenizer.pad_token is None

    assert ensure_pad_token(chat_tokenizer) is chat_tokenizer

    assert chat_tokenizer.pad_token == "<|im_end|>"
    assert chat_tokenizer.pad_token_id == chat_tokenizer.eos_token_id


def test_an_existing_pad_token_is_kept(chat_tokenizer) -> None:
    chat_tokenizer.pad_token = "<|endoftext|>"

    ensure_pad_token(chat_tokenizer)

    assert chat_tokenizer.pad_token == "<|endoftext|>"


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused(chat_tokenizer) -> None:
    chat_tokenizer.eos_token = None

    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        ensure_pad_token(chat_tokenizer)
