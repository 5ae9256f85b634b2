"""Property-based fuzzing of the service's own OpenAPI: no generated request gets a 5xx.

schemathesis reads /openapi.json from a real server and generates requests for every
operation, both ones that follow the schema and ones that break its types and ranges
(hypothesis drives it, derandomized so CI runs are repeatable); each must be answered,
and never with a server error. The teacher's context and k are kept small so that the
valid requests that do run the teacher stay quick.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from service_support import question_rows, write_jsonl

TOKEN = "fuzz-token"
SERVER_SETTINGS = {
    "auth_token": TOKEN,
    "max_k": 4,
    "default_k": 2,
    "max_model_len": 48,
    "max_batch_size": 8,
    "max_response_entries": 2_000,
    "max_prompt_chars": 4_000,
    "job_chunk_rows": 4,
}
# Per operation and mode: about 1,500 requests in all (the probes have nothing to vary).
EXAMPLES = 150


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(server, mode):
    write_jsonl(server.data / "rows.jsonl", question_rows(2))
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def no_server_error(case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
            seen[case.operation.label] = seen.get(case.operation.label, 0) + 1
            # 501 is a deliberate answer (the weight-sync endpoints of a fixed teacher), not
            # a server error.
            assert response.status_code < 500 or response.status_code == 501, (
                f"{case.method} {case.formatted_path} {case.body!r} -> "
                f"{response.status_code} {response.text[:300]}"
            )

        try:
            no_server_error()
        except Unsatisfiable:
            # Nothing to break: an operation with no parameters and no body (the probes).
            assert mode == GenerationMode.NEGATIVE and not operation.body
    print(f"{mode.value}: {sum(seen.values())} requests, {seen}")
    assert sum(seen.values()) >= len(operations) * 5, seen
