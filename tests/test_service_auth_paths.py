"""Bearer-token auth and the data-root confinement of request paths, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support import build_teacher, question_rows, thread_server, write_jsonl

from distillcache.services.teacher.settings import TeacherSettings

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("auth")
    model = build_teacher(root / "teacher", tokenizer_dir)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", question_rows(2))
    write_jsonl(root / "outside.jsonl", question_rows(2))
    settings = TeacherSettings(model=str(model), data_root=data, auth_token=TOKEN)
    with thread_server(settings) as url:
        yield url, root


@pytest.fixture
def client(server: tuple) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server[0], timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        yield c


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
    url = server[0] + path
    assert httpx.request(method, url, json={}).status_code == 401
    wrong = httpx.request(method, url, json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == "Bearer"


def test_requests_with_the_token_are_served(client):
    r = client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_probes_and_metrics_stay_open_for_orchestrators(server):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(server[0] + path).status_code == 200


@pytest.mark.parametrize(
    "path", ["../outside.jsonl", "../../etc/passwd", "sub/../../outside.jsonl", "/etc/passwd"]
)
def test_input_paths_outside_the_data_root_are_refused(client, path):
    r = client.post("/v1/jobs", json={"input": path, "output": "ds"})
    assert r.status_code in (400, 403), r.text
    assert r.json()["detail"].startswith("input:")


def test_an_absolute_input_path_inside_the_data_root_is_accepted(client, server):
    inside = server[1] / "data" / "rows.jsonl"
    r = client.post("/v1/jobs", json={"input": str(inside), "output": "abs", "max_tokens": 2})
    assert r.status_code == 201, r.text


def test_a_symlink_out_of_the_data_root_is_refused(client, server):
    link = server[1] / "data" / "escape.jsonl"
    link.symlink_to(server[1] / "outside.jsonl")
    r = client.post("/v1/jobs", json={"input": "escape.jsonl", "output": "ds"})
    assert r.status_code == 403


@pytest.mark.parametrize("output", ["../ds", "a/b", "..", ".hidden", "/tmp/ds"])
def test_output_dataset_names_that_are_not_one_plain_name_are_refused(client, output):
    r = client.post("/v1/jobs", json={"input": "rows.jsonl", "output": output})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("output:")
