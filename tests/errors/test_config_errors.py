"""Config values that pass type checks but cannot work: refused at load time (exit 2), naming the
file and the dotted field."""

from __future__ import annotations

import re

import pytest

from stackrec_dist.config import ConfigError, load_config
from tests.errors.conftest import assert_one_line, run_cli, write_job

CONFIG = 2


@pytest.mark.parametrize("override, field", [
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("train.epochs=nan", "train.epochs"),
    ("optim.betas=[0.9, .inf]", "optim.betas[1]"),
    ("model.dropout=-.inf", "model.dropout"),
])
def test_non_finite_numbers_refused(override, field):
    with pytest.raises(ConfigError, match=re.escape(f"<defaults>: {field} must be a finite number")):
        load_config(None, [override])


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(device):
    assert load_config(None, [f"train.device={device}"]).train.device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "cuda:x", "CPU", "mps0", ""])
def test_device_names_refused(device):
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda or cuda:N"):
        load_config(None, [f"train.device={device}"])


def test_checkpoint_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a directory")
    for path in (blocker, blocker / "sub"):
        with pytest.raises(ConfigError, match=rf"train.checkpoint_dir must be a directory, but {blocker} is a file"):
            load_config(None, [f"train.checkpoint_dir={path}"])
    assert load_config(None, [f"train.checkpoint_dir={tmp_path / 'new' / 'dir'}"])  # not there yet: fine


def test_non_finite_value_in_a_file_through_the_cli(tmp_path, corpus_source):
    job = write_job(tmp_path, corpus_source, optim={"lr": float("nan")})
    res = run_cli("train", "--config", str(job), tmp_path=tmp_path)
    assert_one_line(res, CONFIG, "config", str(job), "optim.lr must be a finite number (got nan)")


def test_bad_device_through_the_cli(tmp_path, corpus_source):
    res = run_cli("train", "--config", str(write_job(tmp_path, corpus_source)), "--set", "train.device=gpu0",
                  tmp_path=tmp_path)
    assert_one_line(res, CONFIG, "config", "train.device must be auto, cpu, cuda or cuda:N (got 'gpu0')")


def test_checkpoint_dir_is_a_file_through_the_cli(tmp_path, corpus_source):
    (tmp_path / "ckpt").write_text("x")
    res = run_cli("train", "--config", str(write_job(tmp_path, corpus_source)), tmp_path=tmp_path)
    assert_one_line(res, CONFIG, "config", "train.checkpoint_dir must be a directory", "is a file")
