"""Input rows of a batch job: read them from a file, check them, render them to token ids.

A batch job runs the teacher over every row of an input file, so a bad row must not
sink the job: each row comes back either as an `InputRow` or as an `InputError` that
names the file, the line and the field at fault, and reading goes on with the next row.
Problems with the file itself (unknown suffix, a truncated or corrupt zstd stream, a
file that is not Parquet) raise `ValueError` naming the file, because the rows after
them cannot be trusted or reached.

Formats, chosen by suffix: JSON lines (`.jsonl`, `.json`), JSON lines compressed with
zstd (`.jsonl.zst`) and Parquet (`.parquet`). All three are streamed, so memory does
not grow with the file.

Row shapes (exactly one prompt field per row):

- `{"question": str, "teacher_solution": str?}`: the seed format, one user turn; the
  teacher solution, when present, is the completion to score.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat prompt.
- `{"prompt": str}`: a plain prompt, one user turn.

Any row may carry `"completion"` (a text to score by teacher forcing instead of
generating). Every other field, `"id"` included, is kept untouched as `meta` so it
reaches the shard beside the teacher's output. A field whose value is null counts as
absent, in `meta` too: a Parquet file holding rows of several shapes has every column
on every row, null where the row did not have the field.
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
PROMPT_FIELDS = ("messages", "prompt", "question")
SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".parquet")

# Compressed bytes read at a time: JSON lines compress 5-10x, so each read inflates to a
# few MiB at most.
_ZSTD_READ_BYTES = 1 << 16
# Parquet rows converted to Python objects at a time, bounding memory on wide rows.
_PARQUET_BATCH_ROWS = 1024
# How much of an offending value an error message quotes.
_QUOTE_CHARS = 40


@dataclass(frozen=True)
class InputRow:
    """One valid input row, whatever its shape on disk.

    `messages` are the prompt turns (`{"role", "content"}` only); `completion` is the
    text to score, or None to generate. `line` is the 1-based line of a JSON lines file
    or the 1-based row of a Parquet file, so a shard row can be traced back to its input.
    """

    source: str
    line: int
    messages: list[dict[str, str]]
    completion: str | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class InputError:
    """A row that could not be used: where it is and what is wrong with it.

    A value yielded beside the good rows, not an exception, so that one bad row is
    reported and skipped instead of stopping the job. `str()` gives the
    `path:line: message` form that editors and CI logs link to.
    """

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


def iter_input_rows(path: str | PathLike[str]) -> Iterator[InputRow | InputError]:
    """Stream the rows of `path`, each as an `InputRow` or an `InputError`.

    Blank lines are skipped silently (they still count for line numbers). An unknown
    suffix raises `ValueError` here, at the call; the file is opened on the first
    `next()`, which raises `FileNotFoundError` as open() does, and a file that cannot be
    read to its end (corrupt Parquet, corrupt or truncated zstd) raises `ValueError`
    naming it when reading gets there.
    """
    source = str(path)
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        records = enumerate(_parquet_records(source), start=1)
    elif name.endswith(".jsonl.zst"):
        records = _json_records(source, _zstd_lines(source))
    elif name.endswith((".jsonl", ".json")):
        records = _json_records(source, _plain_lines(source))
    else:
        raise ValueError(
            f"{source}: unknown input format; accepted suffixes: {', '.join(SUFFIXES)}"
        )
    return _checked_rows(source, records)


def _checked_rows(
    source: str, records: Iterator[tuple[int, Any | InputError]]
) -> Iterator[InputRow | InputError]:
    for line, record in records:
        yield record if isinstance(record, InputError) else parse_row(source, line, record)


def load_input_rows(path: str | PathLike[str]) -> tuple[list[InputRow], list[InputError]]:
    """Read the whole of `path` into memory: the good rows and the errors, each in order."""
    rows: list[InputRow] = []
    errors: list[InputError] = []
    for item in iter_input_rows(path):
        if isinstance(item, InputError):
            errors.append(item)
        else:
            rows.append(item)
    return rows, errors


def parse_row(source: str, line: int, record: Any) -> InputRow | InputError:
    """Check one decoded row and turn it into an `InputRow`, or say what is wrong.

    Only the first problem of a row is reported. Rules beyond the field types: exactly
    one prompt field; prompts and completions must not be empty or blank; a message has
    only `role` (one of `ROLES`) and `content` (a string; other keys are refused rather
    than dropped, since they would change what the teacher sees); and the prompt must
    not end with an assistant turn, with or without a completion, because a
    generation prompt after it would open a second assistant turn. A chat transcript
    whose last assistant turn is the answer to score should move it to `"completion"`.
    """
    try:
        return _parse_row(source, line, record)
    except InputProblem as problem:
        return InputError(source, line, str(problem))


class InputProblem(ValueError):
    """The first problem of a prompt or completion, in words that name the field.

    Row checking turns it into an `InputError` with the row's place; an HTTP request
    turns it into a 422 naming the request's field."""


def _parse_row(source: str, line: int, record: Any) -> InputRow:
    if not isinstance(record, dict):
        raise InputProblem(f"row must be a JSON object, got {_json_type(record)}")
    present = [field for field in PROMPT_FIELDS if record.get(field) is not None]
    if not present:
        raise InputProblem('row has no prompt: give one of "messages", "prompt" or "question"')
    if len(present) > 1:
        both = " and ".join(f'"{field}"' for field in present)
        raise InputProblem(f"row has {both}: give exactly one prompt field")
    shape = present[0]
    consumed = {*PROMPT_FIELDS, "completion"}
    completion = _optional_text(record, "completion")
    if shape == "question":
        consumed.add("teacher_solution")
        solution = _optional_text(record, "teacher_solution")
        if solution is not None and completion is not None:
            raise InputProblem('row has "completion" and "teacher_solution": give one')
        completion = completion if solution is None else solution
        messages = user_turn(check_text(record["question"], "question"))
    elif shape == "prompt":
        messages = user_turn(check_text(record["prompt"], "prompt"))
    else:
        messages = check_messages(record["messages"])
    meta = {
        key: value for key, value in record.items() if key not in consumed and value is not None
    }
    return InputRow(source, line, messages, completion, meta)


def user_turn(text: str) -> list[dict[str, str]]:
    """A plain prompt as the one-turn chat it is rendered as."""
    return [{"role": "user", "content": text}]


def check_text(value: Any, field: str) -> str:
    """A prompt or completion text: a string that is not blank and is valid Unicode."""
    if not isinstance(value, str):
        raise InputProblem(f'field "{field}" must be a string, got {_json_type(value)}')
    if not value.strip():
        raise InputProblem(f'field "{field}" must not be empty')
    _check_unicode(value, field)
    return value


def _check_unicode(value: str, field: str) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputProblem(
            f'field "{field}" holds an invalid character at {e.start} (a lone surrogate)'
        ) from None


def _optional_text(record: dict[str, Any], field: str) -> str | None:
    return None if record.get(field) is None else check_text(record[field], field)


def check_messages(value: Any) -> list[dict[str, str]]:
    """A chat prompt: a non-empty list of `{"role", "content"}` turns (roles from `ROLES`)
    that does not end with an assistant turn. Raises `InputProblem` at the first fault."""
    if not isinstance(value, list):
        raise InputProblem(f'field "messages" must be an array, got {_json_type(value)}')
    if not value:
        raise InputProblem('field "messages" must not be empty')
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InputProblem(
                f'field "{where}" must be an object with "role" and "content", '
                f"got {_json_type(message)}"
            )
        for key, item in message.items():
            if key not in ("role", "content") and item is not None:
                raise InputProblem(
                    f'field "{where}.{key}" is not supported: a message has only '
                    '"role" and "content"'
                )
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise InputProblem(f'field "{where}.role" is missing')
        if role not in ROLES:
            raise InputProblem(
                f'field "{where}.role" must be one of {"/".join(ROLES)}, got {_quote(role)}'
            )
        if content is None:
            raise InputProblem(f'field "{where}.content" is missing')
        if not isinstance(content, str):
            raise InputProblem(
                f'field "{where}.content" must be a string, got {_json_type(content)}'
            )
        _check_unicode(content, f"{where}.content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant":
        raise InputProblem(
            f'field "messages[{len(messages) - 1}].role": the prompt ends with an assistant '
            'turn, leaving the teacher nothing to answer; put an answer to score in "completion"'
        )
    return messages


def _json_type(value: Any) -> str:
    """Name a decoded value's type in JSON's words, which is what the file's author wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quote(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except TypeError:
        text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def _json_records(source: str, lines: Iterable[bytes]) -> Iterator[tuple[int, Any | InputError]]:
    """Number and decode JSON lines, turning an undecodable line into an `InputError`.

    Lines are split on LF only (a CRLF line ends in whitespace JSON ignores), and decoded
    one at a time so that invalid UTF-8 is reported on its own line instead of ending
    the stream. A UTF-8 byte order mark on the first line is dropped.
    """
    for line, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            yield (
                line,
                InputError(
                    source, line, f"line is not valid UTF-8 (byte {exc.start + 1} of the line)"
                ),
            )
            continue
        if line == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as exc:
            yield line, InputError(source, line, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _plain_lines(source: str) -> Iterator[bytes]:
    with open(source, "rb") as file:
        yield from file


def _zstd_lines(source: str) -> Iterator[bytes]:
    with open(source, "rb") as file:
        yield from _split_lines(_zstd_chunks(source, file))


def _zstd_chunks(source: str, file: BinaryIO) -> Iterator[bytes]:
    """Decompress a zstd file piece by piece, raising `ValueError` if it is truncated.

    zstandard's `stream_reader` ends quietly when the input stops inside a frame, so a
    half-copied file would read as a short, valid one. Decompressing frame by frame with
    `decompressobj` shows whether the last frame was complete. Concatenated frames
    (`cat a.zst b.zst`, `pzstd`) are read one after the other.
    """
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    inside_frame = False
    while chunk := file.read(_ZSTD_READ_BYTES):
        while chunk:
            try:
                inflated = frame.decompress(chunk)
            except zstandard.ZstdError as exc:
                raise ValueError(f"{source}: corrupt zstd data: {exc}") from exc
            if inflated:
                yield inflated
            if frame.eof:
                chunk = frame.unused_data
                frame = decompressor.decompressobj()
                inside_frame = False
            else:
                chunk = b""
                inside_frame = True
    if inside_frame:
        raise ValueError(f"{source}: zstd data ends inside a frame: the file is truncated")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-cut a stream of byte chunks at LF, joining a line's pieces only once it ends."""
    pending: list[bytes] = []
    for chunk in chunks:
        first, *rest = chunk.split(b"\n")
        pending.append(first)
        if rest:
            yield b"".join(pending)
            yield from rest[:-1]
            pending = [rest[-1]]
    tail = b"".join(pending)
    if tail:
        yield tail


def _parquet_records(source: str) -> Iterator[dict[str, Any]]:
    """Stream a Parquet file's rows as dicts, a batch of rows at a time."""
    try:
        parquet = pq.ParquetFile(source)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except pa.ArrowException as exc:
        raise ValueError(f"{source}: cannot read Parquet: {exc}") from exc


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The prompt token ids the teacher sees for `messages` (a row's or an HTTP request's,
    checked by `check_messages`): what it answers from.

    With a chat template: `apply_chat_template(messages, add_generation_prompt=True)`,
    so the ids end with the opening of the assistant turn. transformers 5 returns a
    `BatchEncoding` from a tokenizing call (4.x returned a list), so the ids are asked
    for as a dict and read from `input_ids`, which works in both.

    Without one (a base model's tokenizer), see `plain_prompt_text`; the text is encoded
    the way the tokenizer encodes any text, with its special tokens (e.g. Llama's bos).
    """
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return list(tokenizer(plain_prompt_text(messages))["input_ids"])


def plain_prompt_text(messages: list[dict[str, str]]) -> str:
    """The prompt text used when the tokenizer has no chat template.

    A single user turn (every `prompt` and `question` row) is its content exactly, which
    is what a base model is meant to continue. A longer conversation is written as
    `Role: content` paragraphs, with the role capitalised, separated by a blank line and
    closed by `\\n\\nAssistant:`, e.g. `System: Be brief.\\n\\nUser: Hi\\n\\nAssistant:`.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n\n".join([*turns, "Assistant:"])


def render_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """The completion's token ids followed by the eos id, for scoring a given answer.

    Encoded without special tokens (they belong to the prompt) and closed with eos, so
    a scored completion ends the way a generated one that stopped does and the teacher's
    probability of stopping there is scored too. Raises `ValueError` when the tokenizer has
    no eos token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end a completion with")
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token, the eos token, when it has none; return it.

    Qwen- and Llama-style tokenizers ship without a pad token, and batching (padding
    prompts to one length) fails without one. Padding is masked by the attention mask,
    so which id fills it does not matter, and eos is always in the vocabulary. Raises
    `ValueError` when there is no eos either.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
