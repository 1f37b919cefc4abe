from pathlib import Path

import pytest
from helpers import ROOT, job

from posttrain.config import gradient_accumulation_steps, load_job, validate_job
from posttrain.errors import ConfigError


def test_unknown_key_names_path_and_closest(tmp_path):
    raw = job(tmp_path, "x.jsonl", training={"max_step": 3})
    with pytest.raises(
        ConfigError, match=r"unknown key 'training.max_step'; did you mean 'training.max_steps'\?"
    ):
        validate_job(raw)


def test_wrong_type_names_path_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lr': input should be a valid number.*got 'fast'"):
        validate_job(job(tmp_path, "x.jsonl", optim={"lr": "fast"}))


def test_missing_required_key(tmp_path):
    raw = job(tmp_path, "x.jsonl")
    del raw["optim"]["lr"]
    with pytest.raises(ConfigError, match="missing required key 'optim.lr'"):
        validate_job(raw)


def test_batch_arithmetic_is_checked_before_anything_starts(tmp_path):
    raw = job(tmp_path, "x.jsonl", training={"global_batch_size": 6, "micro_batch_size_per_device": 4})
    with pytest.raises(ConfigError, match=r"global_batch_size=6 is not divisible by .* = 4"):
        validate_job(raw)
    cfg = validate_job(
        job(tmp_path, "x.jsonl", training={"global_batch_size": 8, "micro_batch_size_per_device": 2})
    )
    assert gradient_accumulation_steps(cfg.training) == 4
    with pytest.raises(ConfigError, match=r"x world size \(3\) = 6"):
        gradient_accumulation_steps(cfg.training, world_size=3)


def test_overrides_parse_yaml_values_and_unknown_override_fails(tmp_path):
    cfg = load_job(
        ROOT / "configs/tiny/sft.yaml", ["training.max_steps=7", "optim.lr=1e-4", "data.packing=false"]
    )
    assert cfg.training.max_steps == 7 and cfg.optim.lr == 1e-4 and cfg.data.packing is False
    with pytest.raises(ConfigError, match="unknown key 'data.pakcing'; did you mean 'data.packing'"):
        load_job(ROOT / "configs/tiny/sft.yaml", ["data.pakcing=false"])


def test_exactly_one_model_source(tmp_path):
    raw = job(tmp_path, "x.jsonl", model={"path": "/m"})
    with pytest.raises(ConfigError, match="set exactly one of model.path"):
        validate_job(raw)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_shipped_config_validates(path: Path):
    cfg = load_job(path)
    assert cfg.recipe == path.stem  # configs are named after the recipe they run


def test_cli_takes_overrides_before_and_after_flags(monkeypatch, capsys):
    """`posttrain run CONFIG --nproc 4 parallelism.tp=2` (the README's form) keeps both overrides."""
    import posttrain.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_run", lambda args: seen.update(vars(args)) or 0)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_run(parser(), cli._run))
    assert cli.main(["run", "x.yaml", "a.b=1", "--nproc", "4", "parallelism.tp=2"]) == 0
    assert seen["overrides"] == ["a.b=1", "parallelism.tp=2"] and seen["nproc"] == 4
    with pytest.raises(SystemExit):
        cli.main(["run", "x.yaml", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def _with_run(parser, fn):
    for action in parser._subparsers._group_actions:
        action.choices["run"].set_defaults(fn=fn)
    return parser
