"""One bad request fails alone: a backend call that raises is retried request by request,
so the innocent requests batched with it get their answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from distillcache.services.teacher.backend import Query, TeacherOutput
from distillcache.services.teacher.batcher import Batcher
from distillcache.services.teacher.metrics import ServiceMetrics
from distillcache.services.teacher.runtime import open_backend
from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.schema import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POISON = (1, 2, 3, 4)


class FaultyDevice:
    """The real backend, with a fault injected: any call holding the poisoned prompt
    raises, as a device error or a kernel's bad input would."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def generate(self, queries: list[Query]) -> list[TeacherOutput]:
        if any(q.prompt_ids == POISON for q in queries):
            raise RuntimeError("injected device fault")
        return await self.real.generate(queries)


def test_a_request_that_makes_the_backend_raise_fails_alone(tmp_path: Path, teacher_model: Path):
    settings = TeacherSettings(model=str(teacher_model), data_root=tmp_path)

    async def run() -> list[Any]:
        backend = await open_backend(settings)
        metrics = ServiceMetrics()
        batcher = Batcher(
            FaultyDevice(backend),
            metrics,
            queue_size=16,
            max_batch_size=16,
            batch_wait_s=0.2,
            max_inflight=1,
        )
        batcher.start()
        prompts = [(1, 5, 9, 13 + i) for i in range(7)]
        prompts.insert(3, POISON)
        try:
            return await asyncio.gather(
                *(
                    batcher.submit(
                        "generate", [Query("generate", p, 2, sampling=Sampling(max_tokens=2))]
                    )
                    for p in prompts
                ),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()
            await backend.close()

    results = asyncio.run(run())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and "injected device fault" in str(failed[0])
    assert isinstance(results[3], RuntimeError)
    assert all(len(r[0].completion_ids) >= 1 for i, r in enumerate(results) if i != 3)
