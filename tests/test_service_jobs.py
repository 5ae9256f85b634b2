"""Batch jobs through the HTTP API: cache reuse, malformed rows, cancel and resume."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from service_support import (
    metric,
    question_rows,
    wait_job,
    write_jsonl,
)

from distillcache.shared.reader import ShardDataset, verify_dataset

SERVER_SETTINGS = {"default_k": 4, "max_batch_size": 8, "job_chunk_rows": 8, "flush_rows": 16}


def finished_job(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return wait_job(client, r.json()["id"])


def rows_by_key(path: Path) -> dict[str, dict]:
    rows = list(ShardDataset(path).iter_records(verify=True))
    by_key = {row.key: vars(row) for row in rows}
    assert len(by_key) == len(rows), "a key is stored twice"
    return by_key


def assert_same_rows(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for column, value in a[key].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b[key][column], err_msg=column)
            else:
                assert value == b[key][column], column


def test_second_identical_job_runs_zero_teacher_tokens_and_its_output_equals_the_first(
    client, server
):
    data = server.data
    write_jsonl(data / "same.jsonl", question_rows(12))
    request = {"input": "same.jsonl", "k": 4, "max_tokens": 6}
    first = finished_job(client, output="first", **request)
    assert first["state"] == "done", first
    assert first["progress"]["rows_teacher"] == 12 and first["progress"]["teacher_tokens"] > 0

    teacher_tokens = metric(client, "distill_teacher_tokens_total")
    second = finished_job(client, output="second", **request)
    assert second["state"] == "done", second
    p = second["progress"]
    assert (p["rows_teacher"], p["teacher_tokens"], p["rows_cached"]) == (0, 0, 12)
    assert p["cached_tokens"] == first["progress"]["teacher_tokens"]
    assert metric(client, "distill_teacher_tokens_total") == teacher_tokens
    assert_same_rows(rows_by_key(data / "first"), rows_by_key(data / "second"))

    again = finished_job(client, output="first", **request)
    assert again["progress"]["rows_present"] == 12 and again["progress"]["teacher_tokens"] == 0
    assert len(rows_by_key(data / "first")) == 12


def test_malformed_lines_are_reported_by_line_number_and_the_rest_is_cached(client, server):
    data = server.data
    good = question_rows(5)
    lines = [
        good[0],
        "{not json",
        good[1],
        {"neither": "prompt"},
        good[2],
        "",
        good[3],
        {"question": 7},
        good[4],
    ]
    write_jsonl(data / "mixed.jsonl", lines)
    job = finished_job(client, input="mixed.jsonl", output="mixed", max_tokens=4)
    assert job["state"] == "done", job
    errors = {e["line"]: e["message"] for e in job["errors"]}
    assert sorted(errors) == [2, 4, 8]
    assert "invalid JSON" in errors[2] and "no prompt" in errors[4] and "question" in errors[8]
    assert job["progress"]["rows_failed"] == 3
    stored = rows_by_key(data / "mixed")
    assert sorted(row["meta"]["id"] for row in stored.values()) == [r["id"] for r in good]


def test_rows_with_a_completion_are_scored_by_teacher_forcing(client, server, chat_tokenizer):
    data = server.data
    write_jsonl(
        data / "solved.jsonl",
        [{"id": "s1", "question": "What is 1 + 1?", "teacher_solution": "1 + 1 = 2."}],
    )
    job = finished_job(client, input="solved.jsonl", output="solved")
    assert job["state"] == "done", job
    [row] = rows_by_key(data / "solved").values()
    assert row["request"]["mode"] == "score"
    assert row["completion_ids"][-1] == chat_tokenizer.eos_token_id
    assert row["meta"] == {"id": "s1"}
    assert row["token_logprob"].shape == (len(row["completion_ids"]),)
    assert row["tail_logprob"].shape == (len(row["completion_ids"]),)


def test_a_cancelled_job_resumes_to_every_row_exactly_once(client, server):
    data = server.data
    rows = question_rows(48, start=100)
    write_jsonl(data / "long.jsonl", rows)
    created = client.post(
        "/v1/jobs", json={"input": "long.jsonl", "output": "long", "max_tokens": 12}
    ).json()
    client.post(f"/v1/jobs/{created['id']}/cancel")
    cancelled = wait_job(client, created["id"])
    assert cancelled["state"] == "cancelled"
    assert cancelled["progress"]["rows_done"] < len(rows)

    assert client.post(f"/v1/jobs/{created['id']}/resume").status_code == 200
    done = wait_job(client, created["id"])
    assert done["state"] == "done", done
    p = done["progress"]
    assert p["rows_present"] == cancelled["progress"]["rows_done"]
    assert p["rows_present"] + p["rows_teacher"] == len(rows)
    stored = rows_by_key(data / "long")
    assert sorted(r["meta"]["id"] for r in stored.values()) == sorted(r["id"] for r in rows)
    assert verify_dataset(data / "long")[0] == []


def test_job_status_listing_and_unknown_jobs(client, server):
    write_jsonl(server.data / "one.jsonl", question_rows(1))
    created = client.post("/v1/jobs", json={"input": "one.jsonl", "output": "one"}).json()
    wait_job(client, created["id"])
    jobs = client.get("/v1/jobs").json()
    assert created["id"] in {j["id"] for j in jobs}
    assert client.get("/v1/jobs/nope").status_code == 404
    r = client.post("/v1/jobs", json={"input": "missing.jsonl", "output": "x"})
    assert r.status_code == 400 and r.json()["detail"].startswith("input:")
    r = client.post("/v1/jobs", json={"input": "one.jsonl", "output": "x", "k": 10_000})
    assert r.status_code == 422 and r.json()["message"].startswith("k:")


def test_a_job_into_a_dataset_of_another_k_is_refused(client, server):
    write_jsonl(server.data / "k.jsonl", question_rows(1))
    assert (
        finished_job(client, input="k.jsonl", output="k-fixed", k=3, max_tokens=2)["state"]
        == "done"
    )
    r = client.post("/v1/jobs", json={"input": "k.jsonl", "output": "k-fixed", "k": 5})
    assert r.status_code == 409 and r.json()["detail"].startswith("output:")
