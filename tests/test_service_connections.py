"""Connections a server must not keep: sockets that never send a request, and requests
whose client went away while they waited for the teacher."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
from service_support import metric, metric_value, thread_server

from distillcache.services.teacher.readiness import wait_ready
from distillcache.services.teacher.runtime import open_backend
from distillcache.services.teacher.settings import TeacherSettings


def test_sockets_that_never_send_a_request_are_closed_and_probes_answer_again(
    tmp_path: Path, teacher_model: Path
):
    settings = TeacherSettings(
        model=str(teacher_model), data_root=tmp_path, keep_alive_seconds=1, max_connections=8
    )
    with thread_server(settings) as url:
        parsed = urlparse(url)
        idle = [socket.create_connection((parsed.hostname, parsed.port)) for _ in range(8)]
        try:
            for sock in idle:
                sock.settimeout(30)
                assert sock.recv(1) == b"", "the server kept an idle socket open"
        finally:
            for sock in idle:
                sock.close()
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def test_a_client_that_disconnects_while_queued_frees_its_place(
    tmp_path: Path, teacher_model: Path
):
    """One request holds the teacher; clients that give up while queued behind it must
    leave the queue (Starlette does not cancel their handlers by itself), so the teacher
    never runs for them. The teacher is held until the server has answered every quitter
    499 (published state), so the scenario does not depend on how fast it generates."""
    settings = TeacherSettings(
        model=str(teacher_model),
        data_root=tmp_path,
        queue_size=8,
        max_batch_size=1,
        batch_wait_ms=0,
    )
    release = threading.Event()

    async def held_teacher():
        backend = await open_backend(settings)
        generate = backend.generate

        async def generate_when_released(queries):
            await asyncio.to_thread(release.wait, 120)
            return await generate(queries)

        backend.generate = generate_when_released
        return backend

    closed = 'distill_requests_total{route="/v1/generate",status="499"}'
    with thread_server(settings, held_teacher) as url:
        wait_ready(url)

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                long = asyncio.create_task(
                    client.post(
                        "/v1/generate", json={"prompt": "hold the teacher", "max_tokens": 4}
                    )
                )
                # Its cache miss is counted on the event loop just before it is queued.
                miss = 'distill_cache_lookups_total{result="miss"}'
                while metric_value((await client.get("/metrics")).text, miss) < 1:
                    await asyncio.sleep(0.01)
                quitters = [
                    client.post(
                        "/v1/generate",
                        json={"prompt": f"give up {i}", "max_tokens": 2, "cache": "bypass"},
                        timeout=0.3,
                    )
                    for i in range(4)
                ]
                gave_up = await asyncio.gather(*quitters, return_exceptions=True)
                assert all(isinstance(r, httpx.TimeoutException) for r in gave_up)
                deadline = time.monotonic() + 60
                while metric_value((await client.get("/metrics")).text, closed) < 4:
                    assert time.monotonic() < deadline, "the quitters were never answered 499"
                    await asyncio.sleep(0.01)
                release.set()
                assert (await long).status_code == 200

        try:
            asyncio.run(scenario())
        finally:
            release.set()
        with httpx.Client(base_url=url, timeout=60) as client:
            assert metric(client, "distill_queue_depth") == 0
            assert metric(client, "distill_teacher_sequences_total") == 1
            assert metric(client, closed) == 4
