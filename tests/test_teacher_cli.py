"""``distill serve`` / ``distill cache``: flags are the settings' fields, checked by them."""

from __future__ import annotations

import inspect

from typer.testing import CliRunner

from distillcache.cli import app
from distillcache.flags import flag
from distillcache.services.teacher.cli import CACHE_SETTINGS, cache, serve
from distillcache.services.teacher.settings import ScaleOut, TeacherSettings
from distillcache.shared.schema import Sampling

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


def test_serve_has_a_flag_for_every_setting_and_nothing_else():
    assert set(inspect.signature(serve).parameters) == set(TeacherSettings.model_fields)
    result = runner.invoke(app, ["serve", "--help"], env=WIDE)
    assert result.exit_code == 0
    for name, field in TeacherSettings.model_fields.items():
        assert flag(name) in result.output
        assert f"DISTILL_{name.upper()}" in result.output
        assert " ".join(field.description.split()[:3]) in " ".join(result.output.split())


def test_cache_flags_are_its_own_a_named_subset_of_the_settings_and_the_sampling():
    parameters = set(inspect.signature(cache).parameters)
    own = {"input", "teacher", "out", "k", "max_failures"}
    assert parameters == {*own, *CACHE_SETTINGS, *Sampling.model_fields, *ScaleOut.model_fields}
    assert set(CACHE_SETTINGS) <= set(TeacherSettings.model_fields)
    result = runner.invoke(app, ["cache", "--help"], env=WIDE)
    assert result.exit_code == 0
    for name in [*CACHE_SETTINGS, *Sampling.model_fields, *ScaleOut.model_fields]:
        assert flag(name) in result.output


def test_a_bad_setting_is_a_usage_error_naming_the_flag_and_its_variable():
    result = runner.invoke(app, ["serve", "--model", "m", "--port", "70000"], env=WIDE)
    assert result.exit_code == 2
    assert "--port (DISTILL_PORT)" in result.output


def test_sampling_flags_are_checked_by_the_sampling_model_before_any_model_loads(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi"}\n')
    result = runner.invoke(
        app,
        [
            "cache",
            str(rows),
            "--teacher",
            str(tmp_path / "no-such-model"),
            "--out",
            str(tmp_path / "ds"),
            "--temperature",
            "1e-9",
        ],
        env=WIDE,
    )
    assert result.exit_code == 2
    assert "--temperature" in result.output and "greedy" in result.output
    assert not (tmp_path / "ds").exists()
