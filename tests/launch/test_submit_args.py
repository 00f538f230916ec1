"""build_submit_args and friends: pure, no Ray cluster."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

import pytest

from stackrec_dist.launch import submit as ls

SECRET = "very-secret-value-0123456789"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text("name: t\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.yaml").write_text("name: old\n")
    return tmp_path


def test_train_entrypoint_relative_config_and_quoted_overrides(repo, monkeypatch):
    monkeypatch.chdir(repo)
    args = ls.build_submit_args("configs/job.yaml", repo, ["train.max_steps=5", "model.dilations=[1, 2]"])
    assert shlex.split(args.entrypoint) == [
        "python", "-m", "stackrec_dist.cli", "train", "--config", "configs/job.yaml",
        "--set", "train.max_steps=5", "--set", "model.dilations=[1, 2]",
    ]
    assert args.runtime_env["working_dir"] == str(repo.resolve())
    assert ".venv/" in args.runtime_env["excludes"] and "runs/" in args.runtime_env["excludes"]
    assert "env_vars" not in args.runtime_env
    assert args.metadata["config"] == "configs/job.yaml"


def test_absolute_config_and_config_relative_to_working_dir(repo, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    a = ls.build_submit_args(repo / "configs" / "job.yaml", repo)
    b = ls.build_submit_args("configs/job.yaml", repo)
    assert a.entrypoint == b.entrypoint


def test_config_outside_working_dir_or_excluded_is_refused(repo, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "x.yaml"
    other.write_text("name: x\n")
    with pytest.raises(ls.SubmitError, match="outside working_dir"):
        ls.build_submit_args(other, repo)
    with pytest.raises(ls.SubmitError, match="excluded"):
        ls.build_submit_args(repo / "runs" / "old.yaml", repo)
    with pytest.raises(ls.SubmitError, match="does not exist"):
        ls.build_submit_args(repo / "configs" / "nope.yaml", repo)
    with pytest.raises(ls.SubmitError, match="section.field=value"):
        ls.build_submit_args(repo / "configs" / "job.yaml", repo, ["oops"])


def test_credentials_forwarded_only_when_asked_and_masked_in_repr(repo):
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIA123", "AWS_ENDPOINT_URL": "http://s3:8333",
           "HOME": "/root", "RAY_ADDRESS": "http://x:8265"}
    off = ls.build_submit_args(repo / "configs" / "job.yaml", repo, environ=env)
    assert "env_vars" not in off.runtime_env
    on = ls.build_submit_args(repo / "configs" / "job.yaml", repo, environ=env, forward_credentials=True,
                              extra_env={"OMP_NUM_THREADS": "4"})
    assert on.runtime_env["env_vars"] == {
        "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIA123",
        "AWS_ENDPOINT_URL": "http://s3:8333", "OMP_NUM_THREADS": "4",
    }  # HOME / RAY_ADDRESS are not forwarded
    assert set(on.secret_keys) == {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}
    for text in (repr(on), str(on), f"{on}", repr(on.masked_runtime_env())):
        assert SECRET not in text and "AKIA123" not in text
        assert "http://s3:8333" in text
    assert on.client_kwargs()["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET


def test_build_submit_args_does_not_read_os_environ(repo, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    args = ls.build_submit_args(repo / "configs" / "job.yaml", repo, forward_credentials=True)
    assert "env_vars" not in args.runtime_env  # pure: only the environ it is given


def test_explicit_entrypoint_and_pip(repo):
    args = ls.build_submit_args(None, repo, entrypoint="python x.py", extra_pip=["rich==13.7.1"],
                                entrypoint_num_gpus=1)
    assert args.entrypoint == "python x.py"
    assert args.runtime_env["pip"] == ["rich==13.7.1"]
    assert args.client_kwargs()["entrypoint_num_gpus"] == 1
    with pytest.raises(ls.SubmitError, match="config path is required"):
        ls.build_submit_args(None, repo)
    with pytest.raises(ls.SubmitError, match="overrides apply"):
        ls.build_submit_args(None, repo, ["a.b=1"], entrypoint="python x.py")


def test_resolve_address_order():
    env = {"RAY_ADDRESS": "http://b:8265", "RAY_API_SERVER_ADDRESS": "http://a:8265"}
    assert ls.resolve_address("http://c:8265", env) == "http://c:8265"
    assert ls.resolve_address(None, env) == "http://a:8265"
    assert ls.resolve_address(None, {"RAY_ADDRESS": "http://b:8265"}) == "http://b:8265"
    with pytest.raises(ls.SubmitError, match="no Ray cluster address"):
        ls.resolve_address(None, {})


def test_parse_result_takes_the_last_result_line():
    logs = "noise\nSTACKREC_RESULT {\"a\": 1}\n{\"b\": 2}\nSTACKREC_RESULT {\"a\": 3}\ntrailing\n"
    assert ls.parse_result(logs) == {"a": 3}
    assert ls.parse_result("x\n{\"b\": 2}\n") == {"b": 2}
    assert ls.parse_result("nothing") is None


def test_redactor_masks_every_secret():
    r = ls.Redactor(["abc", "abcdef", ""])
    assert r("key=abcdef other=abc") == "key=**** other=****"
    assert ls.Redactor()("unchanged") == "unchanged"


def test_cli_arguments_and_env_parsing(repo, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    ls.add_arguments(parser)
    args = parser.parse_args(["--config", "configs/job.yaml", "--set", "a.b=1", "--wait", "--env", "X=1",
                              "--forward-credentials", "--pip", "rich"])
    assert args.overrides == ["a.b=1"] and args.wait and args.forward_credentials
    assert ls._parse_env(["X=1", "Y=a=b"]) == {"X": "1", "Y": "a=b"}
    with pytest.raises(ls.SubmitError, match="secrets"):
        ls._parse_env([f"AWS_SECRET_ACCESS_KEY={SECRET}"])
    # No address anywhere: a clear error and exit code 2, nothing submitted.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    rc = ls.main(["--config", str(repo / "configs" / "job.yaml"), "--working-dir", str(repo)])
    assert rc == 2
    assert "no Ray cluster address" in capsys.readouterr().err


def test_secret_in_a_submission_error_is_masked(repo, monkeypatch, caplog):
    """Ray's errors may echo the request; the message we raise must not carry the secret."""
    caplog.set_level(logging.DEBUG)

    class Boom:
        def submit_job(self, **kwargs):
            raise RuntimeError(f"server said no to {kwargs['runtime_env']}")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(ls, "make_client", lambda address: Boom())
    with pytest.raises(ls.SubmitError) as err:
        ls.submit(repo / "configs" / "job.yaml", address="http://x:8265", working_dir=repo,
                  forward_credentials=True)
    assert SECRET not in str(err.value) and ls.MASK in str(err.value)
    assert SECRET not in caplog.text


def test_default_excludes_keep_the_upload_small():
    # Ray's package limit is 500 MiB; virtual envs, runs and data caches must never be packed.
    for pattern in (".venv/", "runs/", "/data/", ".cache/", "*.parquet", ".git/"):
        assert pattern in ls.DEFAULT_EXCLUDES


def test_wait_times_out_while_the_job_runs_and_redacts_the_tail():
    """A hung job: --timeout bounds the log tail and the poll; tailed chunks are redacted."""
    import io

    class Status(str):
        def is_terminal(self):
            return False

    class Hung:
        async def tail_job_logs(self, job_id):
            yield f"key={SECRET}\n"
            import asyncio

            await asyncio.sleep(3600)

        def get_job_status(self, job_id):
            return Status("RUNNING")

    out = io.StringIO()
    with pytest.raises(TimeoutError, match="still RUNNING"):
        ls.wait_for_job(Hung(), "raysubmit_x", timeout_s=0.5, poll_s=0.05, redact=ls.Redactor([SECRET]), out=out)
    assert out.getvalue() == f"key={ls.MASK}\n"


def test_config_typo_fails_before_contacting_a_cluster(monkeypatch):
    """The real configs/smoke.yaml with a misspelt override: refused locally, nothing submitted."""
    repo = Path(ls.__file__).resolve().parents[2]
    assert (repo / "configs" / "smoke.yaml").is_file()

    def no_client(address):
        raise AssertionError("must not connect")

    monkeypatch.setattr(ls, "make_client", no_client)
    with pytest.raises(ls.SubmitError, match="train.max_stepz"):
        ls.submit("configs/smoke.yaml", address="http://127.0.0.1:9", overrides=["train.max_stepz=3"],
                  working_dir=repo)
