"""Bearer-token auth and the data-root confinement of request paths, on a real server."""

from __future__ import annotations

import httpx
import pytest
from service_support import question_rows, write_jsonl

TOKEN = "s3cret-token"


SERVER_SETTINGS = {"auth_token": TOKEN}


@pytest.fixture(scope="module", autouse=True)
def input_files(server) -> None:
    """An input file inside the data root and one beside it, outside."""
    write_jsonl(server.data / "rows.jsonl", question_rows(2))
    write_jsonl(server.data.parent / "outside.jsonl", question_rows(2))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/generate"),
        ("POST", "/v1/score"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/datasets"),
    ],
)
def test_requests_without_the_token_get_401(server, method, path):
    url = server.url + path
    assert httpx.request(method, url, json={}).status_code == 401
    wrong = httpx.request(method, url, json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == "Bearer"


def test_requests_with_the_token_are_served(client):
    r = client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_probes_and_metrics_stay_open_for_orchestrators(server):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200


@pytest.mark.parametrize(
    "path", ["../outside.jsonl", "../../etc/passwd", "sub/../../outside.jsonl", "/etc/passwd"]
)
def test_input_paths_outside_the_data_root_are_refused(client, path):
    r = client.post("/v1/jobs", json={"input": path, "output": "ds"})
    assert r.status_code == 403, r.text
    assert r.json()["detail"].startswith("input:") and "outside the data root" in r.text


def test_an_absolute_input_path_inside_the_data_root_is_accepted(client, server):
    inside = server.data / "rows.jsonl"
    r = client.post("/v1/jobs", json={"input": str(inside), "output": "abs", "max_tokens": 2})
    assert r.status_code == 201, r.text


def test_a_symlink_out_of_the_data_root_is_refused(client, server):
    link = server.data / "escape.jsonl"
    link.symlink_to(server.data.parent / "outside.jsonl")
    r = client.post("/v1/jobs", json={"input": "escape.jsonl", "output": "ds"})
    assert r.status_code == 403


@pytest.mark.parametrize("output", ["../ds", "a/b", "..", ".hidden", "/tmp/ds"])
def test_output_dataset_names_that_are_not_one_plain_name_are_refused(client, output):
    r = client.post("/v1/jobs", json={"input": "rows.jsonl", "output": output})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("output:")
