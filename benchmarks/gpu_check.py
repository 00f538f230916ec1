"""The Python half of ``scripts/gpu_check.sh``: device facts, run assertions, the docs section.

    python benchmarks/gpu_check.py facts SMI_CSV OUT_JSON          # nvidia-smi --query-gpu=... output
    python benchmarks/gpu_check.py check-run LOG RUN_DIR OUT_JSON   # ran on cuda, in bf16? (exit 1 if not)
    python benchmarks/gpu_check.py parity-summary OUT_TXT LOG...   # pytest logs -> one line (exit 1 unless all pass)
    python benchmarks/gpu_check.py write-doc RUN DOC                # the "gpu-check" section of DOC
    python benchmarks/gpu_check.py fake RUN                         # fake figures (--cpu-dry-run)

``RUN`` is the check's log directory (``runs/gpu_check/<UTC time>/``): ``steps.tsv`` (one line per
step: name, status, seconds, note; written by the shell script), ``facts.json``, ``kernels.json``
(``benchmarks/kernels.py --json``), ``parity.txt`` (pytest's summary line) and one
``<step>.json`` per checked training run.

``check-run`` evidence, in order: the run's last ``STACKREC_RESULT`` JSON line must exist; if it
carries ``device`` / ``precision`` they must say cuda / bf16; otherwise the DeepSpeed checkpoints
the run left under RUN_DIR decide: the storage location torch recorded for the module's tensors
(``cuda:N``) and their dtype (bf16), or DeepSpeed's ``bf16_`` prefix on the optimizer-state files.
No evidence either way is a failure, not a pass.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, write_section  # noqa: E402 - benchmarks/common.py, beside this script

SECTION = "gpu-check"
SMI_FIELDS = ["name", "driver_version", "memory.total", "memory.used", "compute_cap"]
RESULT_PREFIX = "STACKREC_RESULT "
# STACKREC_RESULT keys (or key endings: the quickstart prefixes them with the plan's label) recorded.
RECORDED = ("ndcg@5", "hr@10", "wall_s", "steps", "step", "train/loss", "train/sequences_per_s")


def parse_smi(text: str) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader``."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    for r in rows:
        if len(r) != len(SMI_FIELDS):
            raise ValueError(f"nvidia-smi row has {len(r)} fields, expected {SMI_FIELDS}: {r}")
    return [dict(zip(SMI_FIELDS, (c.strip() for c in r))) for r in rows]


def last_result(log_text: str) -> dict[str, Any] | None:
    lines = [line for line in log_text.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def checkpoint_evidence(run_dir: Path) -> dict[str, Any]:
    """Devices and dtypes of the module tensors in DeepSpeed ``*model_states.pt`` files under
    ``run_dir``, and whether any optimizer-state file carries DeepSpeed's ``bf16_`` prefix."""
    import torch

    devices: set[str] = set()
    dtypes: set[str] = set()
    files = sorted(run_dir.rglob("*model_states.pt"))
    for path in files:
        def record(storage, location):
            devices.add(location.split(":")[0])
            return storage

        # Our own run's checkpoint (not untrusted input); DeepSpeed pickles non-tensor objects.
        state = torch.load(path, map_location=record, weights_only=False)
        module = state.get("module") or {}
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in module.values()
                      if isinstance(t, torch.Tensor) and t.is_floating_point())
    bf16_optim = sorted(p.name for p in run_dir.rglob("bf16_zero_pp_rank_*optim_states.pt"))
    return {"model_state_files": len(files), "devices": sorted(devices), "dtypes": sorted(dtypes),
            "bf16_optimizer_files": len(bf16_optim)}


def check_run(log_text: str, run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(figures, problems): problems empty when the run demonstrably used CUDA and bf16."""
    problems = []
    result = last_result(log_text)
    if result is None:
        return {}, ["no STACKREC_RESULT line in the log"]
    evidence = checkpoint_evidence(run_dir)
    device, precision = result.get("device"), result.get("precision")
    if device is not None:
        if not str(device).startswith("cuda"):
            problems.append(f"STACKREC_RESULT says device={device!r}, expected cuda")
    elif "cuda" not in evidence["devices"]:
        problems.append(f"no CUDA evidence: no device in STACKREC_RESULT, checkpoint tensors on {evidence['devices']} "
                        f"({evidence['model_state_files']} model-state files under {run_dir})")
    if precision is not None:
        if str(precision) not in ("bf16", "bfloat16"):
            problems.append(f"STACKREC_RESULT says precision={precision!r}, expected bf16")
    elif not (evidence["dtypes"] == ["bfloat16"] or evidence["bf16_optimizer_files"]):
        problems.append(f"no bf16 evidence: no precision in STACKREC_RESULT, checkpoint module dtypes "
                        f"{evidence['dtypes']}, {evidence['bf16_optimizer_files']} bf16_ optimizer files")
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k.endswith(RECORDED)}
    return {"result": metrics, "device": device, "precision": precision, "evidence": evidence}, problems


def parity_summary(logs: list[str]) -> tuple[str, bool]:
    """Sum pytest's final ``N passed, M failed, K skipped`` lines; ok only with passes and nothing else."""
    counts: dict[str, int] = {}
    for text in logs:
        tail = text.strip().splitlines()[-1:] or [""]
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", tail[0]):
            counts[what.rstrip("s") if what.startswith("error") else what] = counts.get(what, 0) + int(n)
    line = ", ".join(f"{n} {what}" for what, n in counts.items() if what != "deselected") or "no pytest summary"
    bad = sum(n for what, n in counts.items() if what not in ("passed", "deselected"))
    return line, counts.get("passed", 0) > 0 and bad == 0


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _steps(run: Path) -> list[list[str]]:
    path = run / "steps.tsv"
    return [line.split("\t") for line in path.read_text().splitlines() if line] if path.exists() else []


def render(run: Path) -> str:
    """The markdown of the "GPU check" section from the figures under ``run``."""
    facts = _read_json(run / "facts.json") or {}
    steps = _steps(run)
    failed = [s[0] for s in steps if s[1] == "FAILED"]
    verdict = "FAILED: " + ", ".join(failed) if failed else "all steps passed"
    gpus = facts.get("gpus") or [{}]
    gpu = gpus[0]
    out = [f"## GPU check (`scripts/gpu_check.sh`)\n",
           f"Run {facts.get('started', '?')} ({'dry run, fake figures' if facts.get('dry_run') else 'real'}): "
           f"**{verdict}**. Device: {gpu.get('name', '?')} (x{len(gpus)}), driver {gpu.get('driver_version', '?')}, "
           f"{gpu.get('memory.total', '?')} MiB, compute capability {gpu.get('compute_cap', '?')}; torch "
           f"{facts.get('torch', '?')}, triton {facts.get('triton', '?')}, CUDA {facts.get('cuda', '?')}. "
           f"Log: `{facts.get('log_dir', run)}`.\n",
           "| step | status | seconds | note |", "|---|---|---:|---|"]
    out += [f"| {s[0]} | {s[1]} | {s[2]} | {s[3] if len(s) > 3 else ''} |" for s in steps]
    parity = (run / "parity.txt").read_text().strip() if (run / "parity.txt").exists() else "not run"
    what = ("dry run: Triton interpreter, smallest shapes of `tests/kernels/test_block_parity.py`"
            if facts.get("dry_run") else "`tests/kernels/test_block_parity_gpu.py`, compiled Triton vs reference, "
            "fp32 + bf16, forward + 10 gradients")
    out.append(f"\nKernel parity ({what}): {parity}.")
    kernels = _read_json(run / "kernels.json")
    if kernels:
        out.append("\nKernel benchmark targets (a MISS is a finding, not a failure; full table in the Kernels (GPU) "
                   "section): " + "; ".join(kernels["target_lines"]) + ".")
    for name in ("quickstart", "zero2", "zero3"):
        run_json = _read_json(run / f"{name}.json")
        if run_json:
            ev = run_json.get("evidence", {})
            figures = ", ".join(f"{k} {v:.4g}" for k, v in sorted(run_json.get("result", {}).items()))
            out.append(f"\n`{name}`: device {run_json.get('device') or ev.get('devices')}, precision "
                       f"{run_json.get('precision') or ev.get('dtypes')} ({ev.get('model_state_files', 0)} "
                       f"model-state files, {ev.get('bf16_optimizer_files', 0)} bf16 optimizer files); {figures}.")
    return "\n".join(out)


def fake(run: Path) -> None:
    """Figures shaped like a real run's, for the dry run of the docs code path."""
    run.mkdir(parents=True, exist_ok=True)
    facts = json.loads((run / "facts.json").read_text()) if (run / "facts.json").exists() else {}
    facts.update(dry_run=True, gpus=parse_smi("NVIDIA H200 (fake), 570.00, 143771, 0, 9.0\n"))
    (run / "facts.json").write_text(json.dumps(facts))
    (run / "kernels.json").write_text(json.dumps({"target_lines": [
        "PASS: fused >= 1.5x eager fwd+bwd bf16, every shape: 1.70x (min over shapes)",
        "MISS: >= 60% of the HBM roofline at C=64: 55% (at 1024x200x64)"]}))
    for name in ("quickstart", "zero2", "zero3"):
        (run / f"{name}.json").write_text(json.dumps({"result": {"test/ndcg@5": 0.1}, "device": "cuda:0",
                                                      "precision": "bf16", "evidence": {}}))


def main(argv: list[str]) -> int:
    cmd, *rest = argv or ["-h"]
    if cmd == "facts":
        smi_csv, out = rest
        import torch

        facts = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        facts.update(gpus=parse_smi(Path(smi_csv).read_text()), torch=torch.__version__, cuda=torch.version.cuda)
        try:
            import triton

            facts["triton"] = triton.__version__
        except ImportError:
            facts["triton"] = None
        Path(out).write_text(json.dumps(facts, indent=1))
        print(json.dumps(facts))
        return 0
    if cmd == "check-run":
        log, run_dir, out = rest
        figures, problems = check_run(Path(log).read_text(errors="replace"), Path(run_dir))
        Path(out).write_text(json.dumps(figures, indent=1, default=str))
        print(json.dumps(figures, default=str))
        for p in problems:
            print(f"gpu_check: {log}: {p}", file=sys.stderr)
        return 1 if problems else 0
    if cmd == "parity-summary":
        out, *logs = rest
        line, ok = parity_summary([Path(log).read_text(errors="replace") for log in logs])
        Path(out).write_text(line + "\n")
        print(f"parity: {line}")
        return 0 if ok else 1
    if cmd == "write-doc":
        run, doc = rest
        body = render(Path(run))
        write_section(SECTION, body, Path(doc) if doc else DOCS)
        print(body)
        return 0
    if cmd == "fake":
        fake(Path(rest[0]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
