from pathlib import Path

import pytest

from stackrec_dist.config import ConfigError, JobConfig, dump_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, JobConfig)
    assert cfg.model.dilations == [1, 4]
    assert cfg.model.alpha_init == 0.0


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["model.dim=32", "model.dilations=[1, 2, 4]", "optim.lr=3e-4", "train.progress=false"])
    assert cfg.model.dim == 32 and cfg.model.dilations == [1, 2, 4]
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.progress is False


def test_yaml_file_and_roundtrip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmodel:\n  num_blocks: 8\nplan:\n  - {name: a, action: train}\n  - {name: b, action: grow}\n")
    cfg = load_config(path)
    assert cfg.model.num_blocks == 8 and [s.action for s in cfg.plan] == ["train", "grow"]
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dim=-1", "model.dim must be > 0"),
        ("model.dim=abc", "model.dim must be an integer"),
        ("model.backbone=rnn", "model.backbone must be one of"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("model.colour=3", "unknown field model.colour"),
        ("distributed.zero_stage=4", "distributed.zero_stage must be 0, 1, 2 or 3"),
        ("model.block_dilations=[1, 2]", "model.block_dilations must be empty or 4"),
        ("train.progress=3", "train.progress must be true or false"),
        ("novel=1", "unknown field novel"),
        ("plan=[{name: a, action: train, lr: -1.0}]", r"plan\[0\].lr must be >= 0"),
        ("plan=[{name: a, action: train, warmup_steps: -2}]", r"plan\[0\].warmup_steps must be >= 0"),
    ],
)
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optim.lr must be > 0"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_syntax():
    assert parse_override("a.b=[1,2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("model.dim")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=["defaults", *[p.name for p in CONFIGS]])
def test_config_dump_shows_doc_lines_and_loads_back(path):
    import yaml

    from stackrec_dist.config import config_from_dict, dump_config

    cfg = load_config(path)
    text = dump_config(cfg)
    assert "  lr: " in text and "# Peak learning rate (AdamW)." in text
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_a_stage_sets_its_own_learning_rate_and_warmup(tmp_path):
    from stackrec_dist.growth.segment import stage_job_config

    cfg = load_config(None, ["optim.lr=2e-3", "optim.warmup_steps=200",
                             "plan=[{name: a, action: train}, {name: b, action: grow}, "
                             "{name: c, action: train, lr: 5.0e-4, warmup_steps: 0}]"])
    first = stage_job_config(cfg, cfg.plan[0], cfg.model, tmp_path / "a")
    grown = stage_job_config(cfg, cfg.plan[2], cfg.model, tmp_path / "c")
    assert (first.optim.lr, first.optim.warmup_steps) == (2e-3, 200)
    assert (grown.optim.lr, grown.optim.warmup_steps) == (5e-4, 0)


def test_a_plan_wide_schedule_gives_each_train_stage_its_slot(tmp_path):
    from stackrec_dist.growth.segment import plan_schedule_slot, stage_job_config
    from stackrec_dist.train.schedule import ScheduleSlot

    cfg = load_config(None, ["optim.lr=2e-3", "optim.warmup_steps=200", "optim.schedule=plan", "train.epochs=3",
                             "plan=[{name: a, action: train, epochs: 10}, {name: b, action: grow}, "
                             "{name: c, action: train, epochs: 4, warmup_steps: 50}, {name: d, action: grow}, "
                             "{name: e, action: train, max_steps: 300}]"])
    per_epoch = lambda data: 150  # noqa: E731
    assert plan_schedule_slot(cfg, 0, per_epoch) == ScheduleSlot(start=0, total=2400, ramp=0)
    assert plan_schedule_slot(cfg, 2, per_epoch) == ScheduleSlot(start=1500, total=2400, ramp=50)
    assert plan_schedule_slot(cfg, 4, per_epoch) == ScheduleSlot(start=2100, total=2400, ramp=0)
    # the curve's warm-up stays the plan's; the stage's warmup_steps is its ramp, not a restart
    grown = stage_job_config(cfg, cfg.plan[2], cfg.model, tmp_path / "c")
    assert (grown.optim.lr, grown.optim.warmup_steps) == (2e-3, 200)
    per_stage = load_config(None, ["plan=[{name: a, action: train}]"])
    assert plan_schedule_slot(per_stage, 0, per_epoch) is None


def test_an_unknown_schedule_scope_is_refused():
    with pytest.raises(Exception, match=r"optim.schedule"):
        load_config(None, ["optim.schedule=global"])
