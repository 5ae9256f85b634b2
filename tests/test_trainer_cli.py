"""``distill train``: flags and config files mirror ``TrainConfig``; a real run from each."""

from __future__ import annotations

import inspect
import json

import pytest
import yaml
from trainer_support import task_tokenizer, tiny_model, write_teacher_shards
from typer.testing import CliRunner

from distillcache.cli import app, main
from distillcache.shared.tiny_models import synthetic_task_rows
from distillcache.trainer.cli import config_flags, train
from distillcache.trainer.config import TrainConfig, load_config

runner = CliRunner()

# Tiny matmuls run far faster on one thread than on two contended ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = task_tokenizer(root / "tokenizer")
    teacher = tiny_model(root / "teacher", tokenizer, seed=3)
    rows = list(synthetic_task_rows(40, seed=6))
    shards = write_teacher_shards(teacher, rows, root / "shards", k=4, row_group_tokens=400)
    return {"shards": shards, "student": tiny_model(root / "student", tokenizer, seed=5)}


def test_every_config_field_is_a_flag_and_every_flag_a_config_field():
    parameters = set(inspect.signature(train).parameters)
    assert parameters == {"config", *TrainConfig.model_fields}
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in config_flags().values():
        assert flag in result.output


def test_help_says_reverse_kl_and_jsd_over_a_cached_top_k_are_approximations():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert "reverse_kl and jsd over a cached top-k are approximations" in text


def test_toml_yaml_and_flags_give_the_same_config(tmp_path):
    settings = {
        "data": "d",
        "student": "s",
        "output_dir": "o",
        "loss": "jsd",
        "beta": 0.2,
        "temperature": 2.0,
        "packing": True,
        "eval_data": "e",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    # JSON scalars are TOML scalars too, booleans included; keys in the flags' spelling.
    toml = "".join(
        f"{key.replace('_', '-')} = {json.dumps(value)}\n" for key, value in settings.items()
    )
    (tmp_path / "c.toml").write_text(toml)
    from_yaml = load_config(tmp_path / "c.yaml", {})
    from_toml = load_config(tmp_path / "c.toml", {})
    from_flags = load_config(None, settings)
    assert from_yaml == from_toml == from_flags
    overridden = load_config(tmp_path / "c.yaml", {"beta": 0.9, "packing": False, "loss": None})
    assert (overridden.beta, overridden.packing, overridden.loss) == (0.9, False, "jsd")


def test_a_bad_value_is_reported_with_its_flag(tmp_path):
    args = ["train", "--data", "d", "--student", "s", "--output-dir", str(tmp_path)]
    result = runner.invoke(app, [*args, "--temperature", "0"])
    assert result.exit_code == 2
    assert "--temperature" in result.output
    result = runner.invoke(app, ["train", "--data", "d"])
    assert result.exit_code == 2 and "--student" in result.output


def test_unknown_keys_in_a_config_file_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("data: d\nstudent: s\noutput_dir: o\nlearning_rate: 1\n")
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2
    assert "learning-rate" in result.output or "learning_rate" in result.output


def test_distill_train_runs_from_a_config_file_with_a_flag_overriding_it(world, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run.toml").write_text(
        f'data = "{world["shards"]}"\nstudent = "{world["student"]}"\n'
        f'output-dir = "{out}"\nmax-steps = 50\nbatch-size = 4\nlr = 1e-3\n'
        'progress = false\ntensorboard = true\nloss = "tvd"\n'
    )
    result = runner.invoke(app, ["train", "-c", str(tmp_path / "run.toml"), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["loss"] == "tvd" and saved["batch_size"] == 4
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2").is_dir()
    assert list((out / "tb").iterdir())


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """The `distill` script's own entry point, in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_an_output_dir_holding_a_run_needs_resume_or_overwrite(world, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(world["shards"]), "--student", str(world["student"])]
    args += ["--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    args += ["--no-tensorboard", "--eval-fraction", "0.25"]
    code, err = run_main(args, capsys)
    assert code == 0
    # Each evaluation and a closing summary reach the terminal, not only metrics.jsonl.
    assert "step 1: held-out KL" in err
    for label in ("held-out KL to the teacher", "held-out top-1 agreement", "model", "metrics"):
        assert label in err
    first = (out / "metrics.jsonl").read_text()

    code, err = run_main(args, capsys)
    assert code == 1
    [line] = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: --output-dir") and "--resume auto" in line
    assert (out / "metrics.jsonl").read_text() == first, "the refused run touched the old one"

    assert run_main([*args, "--overwrite"], capsys)[0] == 0
    assert (out / "metrics.jsonl").read_text().count('"step"') == first.count('"step"')


def test_mistakes_are_named_before_the_student_loads(world, tmp_path, capsys):
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"question": "1 + 1?", "teacher_solution": "2"}) + "\n")
    base = ["train", "--output-dir", str(tmp_path / "r")]
    cases = {
        "no such directory": ["--data", str(world["shards"]), "--student", "./nope"],
        "only --loss sft trains on it": ["--data", str(seed), "--student", str(world["student"])],
        "no such seed file or dataset": [
            "--data",
            str(tmp_path / "missing"),
            "--student",
            str(world["student"]),
        ],
    }
    for expected, args in cases.items():
        code, err = run_main([*base, *args], capsys)
        assert code == 1 and expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_run_without_data_is_on_policy_only_and_says_what_is_missing(tmp_path, capsys):
    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "1 + 1?"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1?"}) + "\n" + json.dumps({"prompt": " "}) + "\n")
    # A hub-shaped student that is nowhere and a teacher that is down: each case must be
    # refused before either is reached.
    base = ["train", "--student", "nobody/nothing", "--output-dir", str(tmp_path / "r")]
    base += ["--teacher-url", "http://127.0.0.1:9"]
    with_prompts = ["--prompts", str(good)]
    usage = {
        "data is missing: on_policy_fraction 0.0": with_prompts,
        "data is missing: on_policy_fraction 0.5": [*with_prompts, "--on-policy-fraction", "0.5"],
        "prompts is missing": ["--on-policy-fraction", "1"],
        "on_policy_warmup_steps": [
            *with_prompts,
            "--on-policy-fraction",
            "1",
            "--on-policy-warmup-steps",
            "2",
        ],
    }
    for expected, args in usage.items():
        result = runner.invoke(app, [*base, *args], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    only = ["--on-policy-fraction", "1"]
    files = {
        f"--prompts {bad}:2: ": ["--prompts", str(bad)],
        "no such prompt file": ["--prompts", str(tmp_path / "none.jsonl")],
        f"--eval-data {bad}:2: ": ["--prompts", str(good), "--eval-data", str(bad)],
    }
    for expected, args in files.items():
        code, err = run_main([*base, *only, *args], capsys)
        assert code == 1 and expected in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
