"""Sampled sparse logits (RS-KD) end to end: the shard layout, capture, cache identity, loss.

A sampled dataset stores per scored position the distinct ids of N draws from the
teacher's tempered distribution and their counts (docs/shard-format.md). The checks:

- the trainer's estimator against a dense float64 reference: exactly
  ``-sum_i (c_i/N) log p(x_i)`` (value and gradient) on given counts, and on average over
  many draws the gradient of forward KL(q || p), within a bound set by the draws' own
  variance;
- capture through the real ``distill cache`` on the tiny teacher: counts sum to N at every
  position, a recomputed row redraws the same tokens, and the draws' frequencies match the
  teacher's full softmax at the stated temperature (a chi-square over equal-mass bins of
  the teacher's distribution, which rejects the same draws against the untempered
  teacher);
- cache identity: a sampled request is never answered by top-k rows, nor the reverse;
- the layout reads in pyarrow, pandas and DuckDB as documented, top-k datasets keep
  version 2, and training on a sampled dataset lowers the held-out KL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from service_support import DISTILL, question_rows, write_jsonl
from typer.testing import CliRunner

from distillcache.cli import app
from distillcache.shared.manifest import read_manifest
from distillcache.shared.reader import PAD_ID, ShardDataset
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo, SampledLogits, layout_version
from distillcache.shared.tiny_models import build_tiny_model
from distillcache.shared.writer import ShardWriter
from distillcache.trainer.sparse_kd import LossSpec, chunked_head_loss

ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
DRAWS = 128
TEMPERATURE = 1.5
SAMPLED_FLAGS = ["--sampled-draws", str(DRAWS), "--sample-temperature", str(TEMPERATURE)]
# The module's HTTP server (tests/conftest.py's ``server``) draws too; the one-byte codec
# named here must not round its answers (ln(count / N) are served exact).
SERVER_SETTINGS = {"sampled_draws": 32, "logprob_codec": "cbrt-u8", "flush_rows": 1}


# --- the estimator ------------------------------------------------------------------


def draw(q: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RS-KD's stored form of ``n`` draws per row of ``q`` [P, V]: distinct ids padded with
    -1 (as the reader decodes them) and ``ln(count / n)`` padded with -inf."""
    picks = torch.multinomial(q, n, replacement=True, generator=gen)
    ids = torch.full((len(q), n), PAD_ID, dtype=torch.long)
    logw = torch.full((len(q), n), -torch.inf)
    for j, row in enumerate(picks):
        u, c = torch.unique(row, return_counts=True)
        ids[j, : len(u)], logw[j, : len(u)] = u, (c.double() / n).log().float()
    return ids, logw


def head_loss(logits: torch.Tensor, ids, logw, spec: LossSpec, labels=None):
    """``chunked_head_loss`` with an identity head, so that hidden states are logits:
    returns (summed loss, its gradient with respect to the logits)."""
    hidden = logits.clone().float().requires_grad_(True)
    weight = torch.eye(logits.shape[1])
    labels = torch.zeros(len(logits), dtype=torch.long) if labels is None else labels
    loss, _ = chunked_head_loss(hidden, weight, labels, ids, logw, None, spec)
    loss.backward()
    return loss.detach().double(), hidden.grad.double()


def test_the_estimator_is_exactly_minus_the_counted_student_log_probs(one_torch_thread):
    gen = torch.Generator().manual_seed(0)
    vocab, positions, n = 40, 37, 16
    logits = 3 * torch.randn(positions, vocab, generator=gen, dtype=torch.float64)
    q = torch.softmax(2 * torch.randn(positions, vocab, generator=gen, dtype=torch.float64), -1)
    ids, logw = draw(q, n, gen)
    labels = torch.randint(vocab, (positions,), generator=gen)
    for alpha in (0.0, 0.3):
        spec = LossSpec(vocab_size=vocab, chunk_size=8, sampled=True, alpha=alpha)
        loss, grad = head_loss(logits, ids, logw, spec, labels)
        # Dense float64 reference: counts scattered onto the vocabulary.
        z = logits.clone().requires_grad_(True)
        log_p = torch.log_softmax(z, -1)
        counts = torch.zeros(positions, vocab, dtype=torch.float64)
        present = ids >= 0
        counts[torch.nonzero(present)[:, 0], ids[present]] = (
            logw[present].double().exp() * n
        ).round()
        assert torch.equal(counts.sum(-1), torch.full((positions,), float(n), dtype=torch.float64))
        estimator = -(counts / n * log_p).sum()
        ce = -log_p.gather(1, labels[:, None]).sum()
        want = (1 - alpha) * estimator + alpha * ce
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(grad, z.grad, rtol=1e-4, atol=1e-6)


def test_on_average_over_draws_the_gradient_is_forward_kls(one_torch_thread):
    """E[grad] = grad KL(q || p) = p - q per position; the mean over R independent draw
    sets lies within 5 standard errors of it, the error being each entry's own
    sqrt(q (1 - q) / (N R)) (the estimator's gradient is p - counts / N)."""
    gen = torch.Generator().manual_seed(1)
    vocab, rows, n = 30, 4000, 8
    q = torch.softmax(2 * torch.randn(vocab, generator=gen, dtype=torch.float64), -1)
    z = torch.randn(vocab, generator=gen, dtype=torch.float64)
    ids, logw = draw(q.expand(rows, vocab), n, gen)
    spec = LossSpec(vocab_size=vocab, chunk_size=1024, sampled=True)
    _, grad = head_loss(z.expand(rows, vocab), ids, logw, spec)
    mean = grad.mean(0)
    z_ref = z.clone().requires_grad_(True)
    p_log = torch.log_softmax(z_ref, -1)
    (q * (q.log() - p_log)).sum().backward()
    err = (q * (1 - q) / (n * rows)).sqrt()
    assert ((mean - z_ref.grad).abs() <= 5 * err + 1e-7).all(), (mean - z_ref.grad) / err
    # Not a tautology: the bias of top-k renormalized (p - q restricted and rescaled) is far
    # outside the same bound.
    top = q.topk(8).indices
    q_top = torch.zeros_like(q).index_put_((top,), q[top] / q[top].sum())
    assert ((mean - (torch.softmax(z, -1) - q_top)).abs() > 5 * err + 1e-7).any()


def test_sampled_data_refuses_other_divergences_and_temperatures():
    ids = torch.tensor([[0, PAD_ID]])
    logw = torch.tensor([[0.0, -torch.inf]])
    for change in ({"loss": "reverse_kl"}, {"loss": "jsd"}, {"temperature": 2.0}):
        spec = LossSpec(vocab_size=4, sampled=True, **change)
        with pytest.raises(ValueError, match="forward_kl at --temperature 1 only"):
            head_loss(torch.zeros(1, 4), ids, logw, spec)


# --- the shard layout ---------------------------------------------------------------


def sampled_info(draws: int) -> DatasetInfo:
    return DatasetInfo(
        teacher_model="t", tokenizer="t", tokenizer_hash="h", vocab_size=60, logit_width=64,
        k=draws, sampled=SampledLogits(draws=draws, temperature=2.0), logprob_codec="float32",
        backend="transformers", backend_version="test",
    )  # fmt: skip


def sampled_record(key: str, positions: int, draws: int, rng) -> SequenceRecord:
    ids = np.full((positions, draws), PAD_ID, np.int32)
    logw = np.full((positions, draws), -np.inf, np.float32)
    for j in range(positions):
        u, c = np.unique(rng.integers(0, 60, draws), return_counts=True)
        order = rng.permutation(len(u))  # any order in memory; sorted on disk
        ids[j, : len(u)], logw[j, : len(u)] = u[order], np.log(c[order] / draws)
    return SequenceRecord(
        key=key, prompt_ids=[1, 2, 3], completion_ids=np.arange(4, 4 + positions),
        topk_ids=ids, topk_logprobs=logw, token_logprob=np.full(positions, -1.0),
        tail_logprob=np.full(positions, -np.inf),
    )  # fmt: skip


def test_the_layout_round_trips_and_reads_in_pyarrow_pandas_and_duckdb(tmp_path):
    import duckdb
    import pandas as pd

    rng = np.random.default_rng(0)
    records = [sampled_record(f"{i:064x}", 5 + i, 40, rng) for i in range(6)]
    with ShardWriter(tmp_path / "s", sampled_info(40)) as writer:
        writer.write_many(records)
    manifest = read_manifest(tmp_path / "s")
    assert manifest.schema_version == manifest.info.schema_version == 3
    read = list(ShardDataset(tmp_path / "s").iter_records(verify=True))
    for want, got in zip(records, read, strict=True):
        for j in range(want.n_scored):
            real = want.topk_ids[j] != PAD_ID
            order = np.argsort(want.topk_ids[j][real])
            assert got.topk_ids[j][: real.sum()].tolist() == want.topk_ids[j][real][order].tolist()
            np.testing.assert_array_equal(
                got.topk_logprobs[j][: real.sum()], want.topk_logprobs[j][real][order]
            )
            assert (got.topk_ids[j][real.sum() :] == PAD_ID).all()
    table = pq.read_table(tmp_path / "s")
    assert "topk_ids" not in table.column_names and "tail_logprob" not in table.column_names
    assert str(table.schema.field("sample_counts").type) == "list<element: list<element: uint8>>"
    frame = pd.read_parquet(tmp_path / "s")
    assert all(int(sum(c)) == 40 for row in frame.sample_counts for c in row)
    sql = table.schema.field("sample_counts").metadata[b"decode_sql"].decode()
    assert table.schema.metadata[b"distillcache.sample_counts.decode_sql"].decode() == sql
    got = duckdb.sql(
        f"SELECT key, list_transform(sample_counts[1], lambda x: {sql}) AS lp,"
        f" sample_ids[1] AS ids FROM read_parquet('{tmp_path / 's'}/*.parquet')"
    ).fetchall()
    by_key = {r.key: r for r in records}
    for key, lp, ids in got:
        real = by_key[key].topk_ids[0] != PAD_ID
        row = by_key[key]
        want = dict(zip(row.topk_ids[0][real].tolist(), row.topk_logprobs[0][real], strict=True))
        assert ids == sorted(want) and np.allclose(lp, [want[i] for i in ids], atol=1e-6)


def test_every_ecosystem_reader_sees_the_same_draws(tmp_path):
    """pyarrow, pandas, polars, DuckDB and datasets, on the directory as it is, against
    the records' draws sorted by id."""
    import duckdb
    import pandas as pd
    import polars as pl
    from datasets import load_dataset

    rng = np.random.default_rng(2)
    records = [sampled_record(f"{i:064x}", 3 + i, 16, rng) for i in range(7)]
    root = tmp_path / "s"
    with ShardWriter(root, sampled_info(16), max_shard_rows=3) as writer:
        writer.write_many(records)
    want = {}
    for r in records:
        ids, counts = [], []
        for j in range(r.n_scored):
            real = r.topk_ids[j] != PAD_ID
            order = np.argsort(r.topk_ids[j][real])
            ids.append(r.topk_ids[j][real][order].tolist())
            counts.append(
                np.rint(np.exp(r.topk_logprobs[j][real][order]) * 16).astype(int).tolist()
            )
        want[r.key] = (ids, counts)
    cols = ["key", "sample_ids", "sample_counts"]
    t = pq.read_table(root, columns=cols)
    df = pd.read_parquet(root, columns=cols)
    pdf = pl.read_parquet(f"{root}/*.parquet", columns=cols)
    rel = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet('{root}/*.parquet')")
    hf = load_dataset("parquet", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    readers = {
        "pyarrow": zip(*(t.column(c).to_pylist() for c in cols), strict=True),
        "pandas": zip(*(df[c].tolist() for c in cols), strict=True),
        "polars": zip(*(pdf[c].to_list() for c in cols), strict=True),
        "duckdb": rel.fetchall(),
        "datasets": zip(*(hf[c] for c in cols), strict=True),
    }
    for reader, rows in readers.items():
        got = {
            key: ([list(map(int, i)) for i in ids], [list(map(int, c)) for c in counts])
            for key, ids, counts in rows
        }
        assert got == want, reader


def test_counts_that_are_not_n_draws_are_refused_naming_the_record(tmp_path):
    rng = np.random.default_rng(1)
    record = sampled_record("ab" * 32, 3, 40, rng)
    record.topk_logprobs[1, 0] = np.log(39 / 40)  # the position's counts no longer sum to 40
    with pytest.raises(ValueError, match=r"record abababababababab: .* not the dataset's 40 draws"):
        with ShardWriter(tmp_path / "s", sampled_info(40)) as writer:
            writer.write(record)


def test_top_k_datasets_keep_version_2():
    info = sampled_info(8).model_copy(update={"sampled": None})
    topk = DatasetInfo.model_validate_json(info.model_dump_json(exclude={"schema_version"}))
    assert topk.schema_version == layout_version(False) == 2
    with pytest.raises(ValueError, match="schema version 3"):
        DatasetInfo.model_validate({**sampled_info(8).model_dump(), "schema_version": 2})


# --- capture through `distill cache` --------------------------------------------------


def cache(rows, out, teacher, *flags):
    """`distill cache` (the real entry point): (rows by the teacher, rows from the cache)."""
    result = subprocess.run(
        [DISTILL, "cache", str(rows), "--teacher", str(teacher), "--out", str(out),
         "--max-tokens", "6", *flags],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = re.search(r"(\d+) by the teacher .* (\d+) from the cache", result.stderr)
    return int(done.group(1)), int(done.group(2))


def pair_rows(n: int) -> list[dict]:
    """Rows with a solution: the teacher scores them (teacher forcing)."""
    return [
        {"id": f"p{i}", "question": f"What is {i} + {i % 5}?",
         "teacher_solution": f"{i} plus {i % 5} is {i + i % 5}, so the answer is {i + i % 5}."}
        for i in range(n)
    ]  # fmt: skip


def draws_by_key(root) -> dict[str, tuple[list, list]]:
    """Each row's stored draws, read with plain pyarrow (not the project's reader)."""
    table = pq.read_table(root, columns=["key", "sample_ids", "sample_counts"])
    return {row["key"]: (row["sample_ids"], row["sample_counts"]) for row in table.to_pylist()}


@pytest.fixture(scope="module")
def captured(tmp_path_factory, teacher_model):
    """Root ``a``: sampled, again into a second dataset, then top-k; root ``b``: top-k
    first, then sampled; root ``c``: the sampled capture again from nothing (recomputed)."""
    root = tmp_path_factory.mktemp("sampled")
    pairs = write_jsonl(root / "pairs.jsonl", pair_rows(8))
    rows = write_jsonl(root / "rows.jsonl", question_rows(4))
    runs = {
        "a/sampled": cache(pairs, root / "a" / "sampled", teacher_model, *SAMPLED_FLAGS),
        "a/again": cache(pairs, root / "a" / "again", teacher_model, *SAMPLED_FLAGS),
        "a/topk": cache(pairs, root / "a" / "topk", teacher_model, "--k", "16"),
        "a/other-n": cache(pairs, root / "a" / "other-n", teacher_model, "--sampled-draws", "8"),
        "b/topk": cache(pairs, root / "b" / "topk", teacher_model, "--k", "16"),
        "b/sampled": cache(pairs, root / "b" / "sampled", teacher_model, *SAMPLED_FLAGS),
        "c/sampled": cache(pairs, root / "c" / "sampled", teacher_model, *SAMPLED_FLAGS),
        "c/generated": cache(rows, root / "c" / "generated", teacher_model, *SAMPLED_FLAGS),
    }
    return root, runs


def test_every_position_holds_n_draws_as_recorded(captured):
    root, _ = captured
    for name in ("a/sampled", "c/generated"):
        info = ShardDataset(root / name).info
        assert info.sampled == SampledLogits(draws=DRAWS, temperature=TEMPERATURE)
        assert info.k == DRAWS and info.schema_version == 3
        rows = draws_by_key(root / name)
        assert rows
        for ids, counts in rows.values():
            assert all(sum(c) == DRAWS for c in counts)
            assert all(i == sorted(set(i)) for i in ids)


def test_a_recomputed_row_redraws_the_same_tokens(captured):
    root, runs = captured
    assert runs["a/sampled"] == (8, 0) and runs["c/sampled"] == (8, 0)
    assert draws_by_key(root / "c" / "sampled") == draws_by_key(root / "a" / "sampled")


def test_sampled_and_top_k_rows_never_answer_each_other(captured):
    root, runs = captured
    assert runs["a/again"] == (0, 8), "the sampled rows should answer the same sampled run"
    assert draws_by_key(root / "a" / "again") == draws_by_key(root / "a" / "sampled")
    assert runs["a/topk"] == (8, 0), "sampled rows answered a top-k request"
    assert runs["a/other-n"] == (8, 0), "draws of another N answered"
    assert runs["b/sampled"] == (8, 0), "top-k rows answered a sampled request"


def test_a_rerun_in_another_mode_is_refused_naming_it(captured, teacher_model):
    root, _ = captured
    for flags in (["--sampled-draws", "8"], ["--k", "16"]):
        result = subprocess.run(
            [DISTILL, "cache", str(root / "pairs.jsonl"), "--teacher", str(teacher_model),
             "--out", str(root / "a" / "sampled"), *flags],
            capture_output=True, text=True, env=ENV, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "sampled" in result.stderr and "use a new --out" in result.stderr


def equal_mass_bins(log_q: torch.Tensor, bins: int) -> torch.Tensor:
    """Per row of ``log_q`` [P, V] the bin of each id: ids by decreasing probability, cut
    where the cumulative mass crosses a multiple of 1/bins (at each id's midpoint)."""
    q = log_q.exp()
    order = q.argsort(dim=-1, descending=True)
    sorted_q = q.gather(1, order)
    middle = sorted_q.cumsum(-1) - sorted_q / 2
    which = (middle * bins).long().clamp(max=bins - 1)
    return torch.empty_like(which).scatter_(1, order, which)


def chi_square(rows, log_q_by_key, bins: int = 10) -> float:
    """Pearson's statistic of the pooled draws per bin against the counts ``q`` expects."""
    observed = torch.zeros(bins, dtype=torch.float64)
    expected = torch.zeros(bins, dtype=torch.float64)
    for key, (ids, counts) in rows.items():
        log_q = log_q_by_key[key]
        which = equal_mass_bins(log_q, bins)
        for j, (pos_ids, pos_counts) in enumerate(zip(ids, counts, strict=True)):
            observed.index_add_(0, which[j, pos_ids], torch.tensor(pos_counts, dtype=torch.float64))
            expected.index_add_(0, which[j], DRAWS * log_q[j].exp())
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.usefixtures("one_torch_thread")
def test_the_draws_follow_the_teachers_tempered_softmax(captured, teacher_model):
    """Reference: the teacher run here with plain transformers, float64 log-softmax."""
    from transformers import AutoModelForCausalLM

    root, _ = captured
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32).eval()
    vocab = ShardDataset(root / "a" / "sampled").info.vocab_size
    logits_by_key = {}
    with torch.no_grad():
        for record in ShardDataset(root / "a" / "sampled").iter_records():
            seq = torch.tensor(np.concatenate([record.prompt_ids, record.completion_ids]))
            start = record.logprob_start
            logits = model(seq[None].long()).logits[0, start - 1 : len(seq) - 1, :vocab]
            logits_by_key[record.key] = logits.double()
    rows = draws_by_key(root / "a" / "sampled")
    positions = sum(len(ids) for ids, _ in rows.values())
    assert positions > 100

    def tempered(t):
        return {k: torch.log_softmax(v / t, -1) for k, v in logits_by_key.items()}

    # 9 degrees of freedom: P(chi2 > 40) is about 7e-6.
    bound = 40
    assert chi_square(rows, tempered(TEMPERATURE)) < bound
    # The same statistic tells the untempered teacher (here nearly uniform anyway: top
    # probabilities about 0.01 of 400 tokens) from the tempered one.
    assert chi_square(rows, tempered(1.0)) > 2 * bound


def test_http_answers_are_the_draws_fresh_or_cached(client, server):
    body = {"prompt": "What is 2 + 3?", "max_tokens": 5, "k": 4}
    fresh = client.post("/v1/generate", json=body).json()
    again = client.post("/v1/generate", json=body).json()
    assert not fresh["cached"] and again["cached"]
    assert {**again, "cached": False} == fresh
    for ids, lps in zip(fresh["topk_ids"], fresh["topk_logprobs"], strict=True):
        counts = np.exp(np.asarray(lps, dtype=np.float64)) * 32
        assert np.allclose(counts, np.rint(counts), atol=1e-4) and np.rint(counts).sum() == 32
        assert len(set(ids)) == len(ids)
    stored = ShardDataset(server.data / fresh["dataset"])
    assert stored.info.sampled == SampledLogits(draws=32) and "-s" in fresh["dataset"]


def test_http_arrow_answers_are_a_sampled_shards_rows(client):
    import pyarrow as pa

    from distillcache.shared.reader import decode_table
    from distillcache.shared.schema import PARQUET_METADATA_KEY

    body = {"pairs": [{"prompt": "What is 4 + 4?", "completion": "It is 8."}], "k": 4}
    arrow = client.post(
        "/v1/score", json=body, headers={"Accept": "application/vnd.apache.arrow.stream"}
    )
    assert arrow.status_code == 200
    table = pa.ipc.open_stream(arrow.content).read_all()
    info = DatasetInfo.model_validate_json(table.schema.metadata[PARQUET_METADATA_KEY])
    assert info.sampled == SampledLogits(draws=32)
    assert all(sum(c) == 32 for c in table.column("sample_counts").to_pylist()[0])
    batch = decode_table(table, info)
    as_json = client.post("/v1/score", json=body).json()["results"][0]
    assert [sorted(ids[ids != PAD_ID].tolist()) for ids in batch.topk_ids] == [
        sorted(ids) for ids in as_json["topk_ids"]
    ]


def test_the_on_policy_client_refuses_a_sampled_teacher(client, server):
    from distillcache.trainer.teacher_client import TeacherClient

    answer = client.post("/v1/generate", json={"prompt": "What is 1 + 1?", "max_tokens": 3}).json()
    pair = {"prompt_ids": answer["prompt_ids"], "completion_ids": answer["completion_ids"]}
    teacher = TeacherClient(server.url)
    try:
        with pytest.raises(ValueError, match="stores sampled draws .* on-policy training needs"):
            teacher.score([pair], k=4, dataset=None)
    finally:
        teacher.close()


def test_vllm_refuses_the_sampled_mode_at_start_naming_the_backend(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", question_rows(1))
    result = CliRunner().invoke(
        app,
        ["cache", str(rows), "--teacher", "t", "--out", str(tmp_path / "d"), "--backend",
         "vllm", "--sampled-draws", "8"],
        env={"COLUMNS": "300"},
    )  # fmt: skip
    assert result.exit_code == 2
    assert "the vllm backend returns only its top-n log-probs" in result.output


def test_inspect_reports_the_draws_and_no_kl_to_exact(captured):
    root, _ = captured
    result = CliRunner().invoke(app, ["inspect", str(root / "a" / "sampled")], env=ENV)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{DRAWS} draws / position at temperature {TEMPERATURE:g}" in out
    mean = re.search(r"distinct ids / position\s*│\s*([\d.]+)", out)
    rows = draws_by_key(root / "a" / "sampled")
    want = np.mean([len(i) for ids, _ in rows.values() for i in ids])
    assert float(mean.group(1)) == pytest.approx(want, abs=0.01)
    assert "not reported" in out and "codec KL" not in out


# --- training -------------------------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_the_trainer_learns_from_a_sampled_dataset(captured, tokenizer_dir, tmp_path):
    root, _ = captured
    data = str(root / "a" / "sampled")
    student = build_tiny_model(tmp_path / "student", tokenizer_dir, hidden_size=64, seed=4)
    refused = subprocess.run(
        [DISTILL, "train", "--data", data, "--student", str(student), "--output-dir",
         str(tmp_path / "no"), "--loss", "reverse_kl", "--no-progress"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0
    [line] = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert "holds sampled draws" in line and "not --loss reverse_kl" in line
    # Trained on draws at T=1, measured by the exact top-16 + tail of the same teacher.
    data, exact = str(root / "a" / "other-n"), str(root / "a" / "topk")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--data", data, "--eval-data", exact, "--student", str(student),
         "--output-dir", str(out), "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3",
         "--eval-every", "1", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [line["eval/kl"] for line in lines if "eval/kl" in line]
    kd = [line["train/kd"] for line in lines if "train/kd" in line]
    assert all(np.isfinite(kd)) and all(v > 0 for v in kd)
    assert len(kl) == 12 and kl[-1] < 0.85 * kl[0], kl
