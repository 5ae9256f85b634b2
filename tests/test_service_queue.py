"""The bounded queue under load: 64 concurrent clients against a queue of 8."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from service_support import thread_server

from distillcache.services.teacher.settings import TeacherSettings

CLIENTS = 64
QUEUE = 8


def test_64_concurrent_clients_against_a_queue_of_8_get_only_200s_and_429s(
    tmp_path: Path, teacher_model: Path
):
    model = teacher_model
    settings = TeacherSettings(
        model=str(model), data_root=tmp_path / "data", queue_size=QUEUE, max_batch_size=4
    )

    async def client(url: str, i: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            # Distinct prompts: no answer comes from the cache or a shared flight.
            return await c.post("/v1/generate", json={"prompt": f"Count to {i}.", "max_tokens": 16})

    async def burst(url: str) -> list[httpx.Response]:
        return await asyncio.gather(*(client(url, i) for i in range(CLIENTS)))

    with thread_server(settings) as url:
        responses = asyncio.run(burst(url))
        metrics = httpx.get(f"{url}/metrics").text

    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= QUEUE and codes.count(429) > 0, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
    assert 'distill_requests_total{route="/v1/generate",status="429"}' in metrics
