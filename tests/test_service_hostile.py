"""A hostile client against a real server: auth before the body, bounded bodies, prompts
and answers, ranges checked at the edge, and clear 4xx for malformed input."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from service_support import question_rows, write_jsonl

TOKEN = "hostile-test-token"
SERVER_SETTINGS = {
    "auth_token": TOKEN,
    "max_body_bytes": 64 << 10,
    "max_prompt_chars": 2_000,
    "max_response_entries": 5_000,
    "max_k": 16,
    "default_k": 8,
}


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, float]:
    """Send ``head`` (and ``body``) on a plain socket; the status line and how long it took."""
    parsed = urlparse(url)
    began = time.monotonic()
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1]), time.monotonic() - began


def test_an_unauthenticated_huge_body_is_refused_from_its_headers_alone(server):
    # 300 MB announced, none of it sent: a server that read the body would wait forever.
    status, seconds = raw_request(
        server.url,
        "POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        "Content-Length: 300000000\r\n",
    )
    assert status == 401 and seconds < 10


def test_a_body_over_the_limit_gets_413_declared_or_chunked(server, client):
    status, _ = raw_request(
        server.url,
        f"POST /v1/generate HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 300000000\r\n",
    )
    assert status == 413

    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "max_body_bytes" in r.json()["detail"]


def test_a_prompt_over_the_character_limit_is_refused_before_tokenising(client):
    r = client.post("/v1/generate", json={"prompt": "x" * 2_001, "max_tokens": 2})
    assert r.status_code == 422
    assert r.json()["message"].startswith("prompt: is 2,001 characters")
    r = client.post(
        "/v1/score", json={"pairs": [{"prompt": "hi", "completion": "y" * 2_001}], "k": 2}
    )
    assert r.status_code == 422
    assert r.json()["message"].startswith("pairs.0.completion: is 2,001 characters")


def test_an_answer_over_the_entry_limit_gets_413_before_the_teacher_runs(client):
    r = client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 400, "k": 16})
    assert r.status_code == 413
    assert "6,400 log-probs" in r.json()["detail"] and "max_response_entries" in r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),
        ("seed", -1),
        ("temperature", 1e-300),
        ("temperature", 1e300),
        ("top_p", 5e-324),
        ("top_p", 0),
    ],
)
def test_sampling_values_the_backends_cannot_take_are_422_naming_the_field(client, field, value):
    r = client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(f"{field}:")


def test_json_infinity_as_temperature_is_422(client):
    r = client.post(
        "/v1/generate",
        content=b'{"prompt": "hi", "temperature": Infinity}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["message"].startswith("temperature:")


def test_a_lone_surrogate_in_a_prompt_is_422_not_500(client):
    r = client.post(
        "/v1/generate",
        content=b'{"prompt": "bad \\ud800 text", "max_tokens": 2}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("prompt:") and "surrogate" in r.text


def test_malformed_json_says_where(client):
    r = client.post(
        "/v1/generate", content=b'{"prompt": "hi",, }', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422
    assert "invalid JSON at character" in r.json()["message"]


def test_an_empty_completion_is_refused_by_the_rule_job_rows_follow(client):
    r = client.post("/v1/score", json={"pairs": [{"prompt": "hi", "completion": ""}]})
    assert r.status_code == 422
    assert r.json()["message"] == 'pairs.0.completion: field "completion" must not be empty'


@pytest.mark.parametrize("path", ["bad\x00name.jsonl", "x" * 300 + ".jsonl"])
def test_impossible_input_paths_are_400(client, path):
    r = client.post("/v1/jobs", json={"input": path, "output": "ds"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("input:")


def test_an_output_naming_an_existing_file_is_409(client, server):
    write_jsonl(server.data / "rows.jsonl", question_rows(1))
    (server.data / "taken").write_text("not a dataset")
    r = client.post("/v1/jobs", json={"input": "rows.jsonl", "output": "taken"})
    assert r.status_code == 409, r.text


def test_an_output_that_is_a_symlink_out_of_the_root_is_refused(client, server, tmp_path):
    write_jsonl(server.data / "rows.jsonl", question_rows(1))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (server.data / "linked").symlink_to(outside)
    r = client.post("/v1/jobs", json={"input": "rows.jsonl", "output": "linked"})
    assert r.status_code == 409, r.text
    assert list(outside.iterdir()) == []


def test_probes_stay_answerable_while_a_huge_prompt_is_refused(server, client):
    r = client.post("/v1/generate", json={"prompt": "x" * 60_000})
    assert r.status_code == 422
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
