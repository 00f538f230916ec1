"""Residual-block kernels: fused Triton vs eager PyTorch on GPU, and the CPU variants on CPU.

Each mode times forward + backward of one NextItNet residual block (dilation 2, all positions
real, alpha a learnable scalar) and rewrites its own section of docs/benchmarks.md.

    python benchmarks/kernels.py                # GPU: B in {256,1024} x L in {50,200} x C in {64,256,512}, bf16
    python benchmarks/kernels.py --quick        # GPU: two shapes (smoke)
    python benchmarks/kernels.py --compile dynamic --json out.json   # as scripts/gpu_check.sh runs it
    python benchmarks/kernels.py --cpu          # CPU: reference / shifted / gemm / torch.compile, fp32

GPU variants: fused Triton, eager (``reference.py``, cuDNN conv) and ``torch.compile`` of eager
(``--compile static``: one compile per shape, the fairest; ``dynamic``: dynamic shapes, fewer
compiles, though dynamo may still specialise some sizes; ``off``). ``--compile-shapes`` limits it
to some shapes (scripts/gpu_check.sh: the B=1024 ones, to fit its time budget). Targets (issue 13),
printed as PASS/MISS and written with the table (a miss is a finding, not an error): fused >= 1.5x
eager fwd+bwd on every shape, and >= 60% of the HBM roofline at C=64, judged at the largest C=64
shape (B=1024, L=200: ~0.5 GB moved; the small shapes move ~30 MB in ~10 us, where the 7 launches
dominate).

GPU figures: ms is the median over ``--reps`` timed fwd+bwd (CUDA events, after warm-up).
TFLOP/s counts only the conv GEMMs: 2 convs x 2*N*C*C*K FLOPs forward, x3 for fwd+bwd
(dgrad + wgrad), N = B*L. GB/s uses one bytes model for both implementations: the compulsory
traffic of the fused kernels (~19 N*C activation elements read or written per fwd+bwd, see
``_bytes``), so the eager figure is "useful GB/s", not what eager really moves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402 - benchmarks/common.py, beside this script

from stackrec_dist.kernels import residual_block  # noqa: E402
from stackrec_dist.kernels.cpu_block import residual_block_gemm, residual_block_shifted  # noqa: E402
from stackrec_dist.kernels.reference import residual_block_reference  # noqa: E402

K = 3
DILATION = 2
TARGET_SPEEDUP = 1.5  # fused vs eager, bf16 fwd+bwd, every shape
TARGET_HBM = 0.60  # fraction of the HBM roofline at C=64, largest shape
# Dense (no sparsity) peaks from NVIDIA's H100/H200 datasheets: (bf16 tensor TFLOP/s, HBM TB/s).
PEAKS = {
    "H100 SXM": (989.4, 3.35),
    "H100 PCIe": (756.0, 2.0),
    "H100 NVL": (835.0, 3.9),
    "H200": (989.4, 4.8),
}


def _peak(name: str) -> tuple[str, float, float]:
    if "H200" in name:
        key = "H200"
    elif "PCIe" in name:
        key = "H100 PCIe"
    elif "NVL" in name:
        key = "H100 NVL"
    else:
        key = "H100 SXM"  # also the assumption for unknown devices: ratios are then only indicative
    return (key, *PEAKS[key])


def make_block(b: int, seq: int, c: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x (B, L, C), mask (B, L), the 8 block params (conv weights (C, C, K)) and alpha, all leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seq, c, generator=g)
    mask = torch.ones(b, seq)
    params = [torch.randn(c, c, K, generator=g) * c ** -0.5, torch.zeros(c), torch.ones(c), torch.zeros(c),
              torch.randn(c, c, K, generator=g) * c ** -0.5, torch.zeros(c), torch.ones(c), torch.zeros(c)]
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return leaf(x), mask.to(device), [leaf(p) for p in params], leaf(torch.tensor(0.5))


def _flops(b: int, seq: int, c: int) -> float:
    return 3 * 2 * (2 * b * seq * c * c * K)


def _bytes(b: int, seq: int, c: int, elem: int) -> float:
    # fwd: x read twice (conv1, residual), z1 w+r, z2 w, out w = 6; bwd: dout/z2 r + dz2 w = 3,
    # dz2/z1 r + dz1 w = 3, wgrad2 dz2/z1 r = 2, dz1/dout r + dx w = 3, wgrad1 dz1/x r = 2 -> 19.
    return 19 * b * seq * c * elem


def _step(fn, x, mask, params, alpha):
    y = fn(x, mask, *params, alpha, DILATION)
    grads = torch.autograd.grad(y, [x, *params, alpha], torch.ones_like(y))
    return grads


def time_gpu(fn, args, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        _step(fn, *args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, *args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _compiled_eager(mode: str):
    if mode == "off":
        return None
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)  # static: a compile per shape
    return torch.compile(residual_block_reference, dynamic=(mode == "dynamic"))


def _grad_err(fn, blk, g32) -> float:
    """Max over the 10 gradients of max|g - g_fp32| / max|g_fp32|."""
    return max((u.float() - w).abs().max().item() / max(w.abs().max().item(), 1e-6)
               for u, w in zip(_step(fn, *blk), g32))


def judge_targets(rows: list[dict]) -> dict[str, dict]:
    """PASS/MISS of the two targets from the rows of ``run_gpu`` (see the module docstring)."""
    slow = [r for r in rows if r["speedup"] < TARGET_SPEEDUP]
    c64 = max((r for r in rows if r["C"] == 64), key=lambda r: r["B"] * r["L"], default=None)
    return {
        "speedup": {"target": f"fused >= {TARGET_SPEEDUP}x eager fwd+bwd bf16, every shape",
                    "value": min((r["speedup"] for r in rows), default=float("nan")),
                    "pass": bool(rows) and not slow,
                    "detail": "min over shapes" + ("; below: " + ", ".join(
                        f"{r['B']}x{r['L']}x{r['C']} {r['speedup']:.2f}x" for r in slow) if slow else "")},
        "hbm_c64": {"target": f">= {TARGET_HBM:.0%} of the HBM roofline at C=64",
                    "value": c64["hbm_frac"] if c64 else float("nan"),
                    "pass": c64 is not None and c64["hbm_frac"] >= TARGET_HBM,
                    "detail": f"at {c64['B']}x{c64['L']}x64" if c64 else "no C=64 shape run"},
    }


def target_lines(targets: dict[str, dict]) -> list[str]:
    """``PASS: <target>: <value> (<detail>)`` / ``MISS: ...``, one line per target."""
    lines = []
    for key, t in targets.items():
        value = f"{t['value']:.0%}" if key == "hbm_c64" else f"{t['value']:.2f}x"
        lines.append(f"{'PASS' if t['pass'] else 'MISS'}: {t['target']}: {value} ({t['detail']})")
    return lines


def run_gpu(args) -> None:
    if not torch.cuda.is_available():
        msg = ("## Kernels (GPU)\n\n_Not measured yet_: no GPU was available when this was last run "
               f"({time.strftime('%Y-%m-%d')}). Run `python benchmarks/kernels.py` on an H100 to fill "
               "the table: fused Triton vs eager PyTorch vs torch.compile, fwd+bwd, bf16, B in {256, 1024} x L in "
               "{50, 200} x C in {64, 256, 512}; peaks used: H100 SXM 989.4 bf16 dense TFLOP/s, "
               "3.35 TB/s HBM3 (PCIe 756 / 2.0, H200 989.4 / 4.8).\n")
        print(msg)
        if not args.no_write:
            write_section("kernels", msg)
        if args.json:
            raise SystemExit("benchmarks/kernels.py: --json needs a CUDA device (none here)")
        return
    from stackrec_dist.kernels import resolve_impl

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak_key, peak_tflops, peak_tbs = _peak(name)
    assert resolve_impl("auto", dev, torch.bfloat16) == "triton", "triton not importable on this GPU machine"
    shapes = args.shapes or ([(256, 50, 64), (1024, 200, 512)] if args.quick else
                             [(b, seq, c) for b in (256, 1024) for seq in (50, 200) for c in (64, 256, 512)])
    fused = lambda *a: residual_block(*a, impl="triton")  # noqa: E731
    eager = residual_block_reference
    mode = "off" if args.no_compile else args.compile
    compiled = _compiled_eager(mode)
    rows = []
    for b, seq, c in shapes:
        blk = make_block(b, seq, c, torch.bfloat16, "cuda")
        # A benchmark that only times would hide a broken kernel: both bf16 paths are compared with
        # an fp32 eager run on the same values (not with each other: eager bf16 is itself off by
        # up to ~0.5 of a gradient's scale at C=64, measured on CPU).
        up = lambda t: t.detach().float().requires_grad_()  # noqa: E731
        g32 = _step(eager, up(blk[0]), blk[1], [up(p) for p in blk[2]], up(blk[3]))
        err_f, err_e = _grad_err(fused, blk, g32), _grad_err(eager, blk, g32)
        del g32
        t_f = time_gpu(fused, blk, args.warmup, args.reps)
        t_e = time_gpu(eager, blk, args.warmup, args.reps)
        t_c = compile_s = float("nan")
        if compiled is not None and (not args.compile_shapes or (b, seq, c) in args.compile_shapes):
            t0 = time.perf_counter()
            _step(compiled, *blk)  # the compile (static: every shape; dynamic: the first only)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            t_c = time_gpu(compiled, blk, args.warmup, args.reps)
        fl, by = _flops(b, seq, c), _bytes(b, seq, c, 2)
        row = {"B": b, "L": seq, "C": c, "eager_ms": t_e, "fused_ms": t_f, "compiled_ms": t_c,
               "compile_s": compile_s, "speedup": t_e / t_f, "speedup_vs_compiled": t_c / t_f,
               "eager_gbs": by / t_e / 1e6, "fused_gbs": by / t_f / 1e6, "eager_tflops": fl / t_e / 1e9,
               "fused_tflops": fl / t_f / 1e9, "err_fused": err_f, "err_eager": err_e}
        row["hbm_frac"] = row["fused_gbs"] / (peak_tbs * 1e3)
        row["tflops_frac"] = row["fused_tflops"] / peak_tflops
        rows.append(row)
        print(f"B={b:5d} L={seq:4d} C={c:4d}  eager {t_e:8.3f} ms  compiled {t_c:8.3f} ms  fused {t_f:8.3f} ms  "
              f"x{row['speedup']:5.2f}  fused {row['fused_gbs']:7.1f} GB/s ({row['hbm_frac']:.0%} HBM) "
              f"{row['fused_tflops']:6.1f} TFLOP/s  grad err vs fp32 fused {err_f:.1e} eager {err_e:.1e}", flush=True)
        del blk
        torch.cuda.empty_cache()
    targets = judge_targets(rows)
    lines = target_lines(targets)
    print("\n".join(lines))
    head = ("| B | L | C | eager ms | torch.compile ms | fused ms | fused vs eager | fused vs compile (x) | "
            "eager GB/s | fused GB/s | fused %HBM | eager TFLOP/s | fused TFLOP/s | fused %peak | "
            "grad err fused / eager |\n|" + "---|" * 15)
    opt = lambda v, fmt: "-" if math.isnan(v) else format(v, fmt)  # noqa: E731 - torch.compile columns when off
    table = [f"| {r['B']} | {r['L']} | {r['C']} | {r['eager_ms']:.3f} | {opt(r['compiled_ms'], '.3f')} | "
             f"{r['fused_ms']:.3f} | {r['speedup']:.2f}x | {opt(r['speedup_vs_compiled'], '.2f')} | "
             f"{r['eager_gbs']:.0f} | {r['fused_gbs']:.0f} | {100 * r['hbm_frac']:.0f}% | {r['eager_tflops']:.1f} | "
             f"{r['fused_tflops']:.1f} | {100 * r['tflops_frac']:.1f}% | {r['err_fused']:.1e} / {r['err_eager']:.1e} |"
             for r in rows]
    compile_note = ("" if compiled is None else
                    f" torch.compile: `{mode}` shapes, first call (compile + run) in s: "
                    + ", ".join(f"{r['B']}x{r['L']}x{r['C']} {r['compile_s']:.1f}" for r in rows
                                if not math.isnan(r["compile_s"])) + ".")
    body = (f"## Kernels (GPU)\n\nFused Triton residual block vs eager PyTorch (`reference.py`, cuDNN conv) and "
            f"torch.compile of it, forward + backward, bf16, dilation {DILATION}, median of {args.reps} reps. "
            f"Device: {name}; peaks used ({peak_key}, dense): {peak_tflops} bf16 TFLOP/s, {peak_tbs} TB/s. "
            "TFLOP/s counts conv GEMMs only; GB/s uses the fused kernels' compulsory traffic "
            "(19 x N x C x 2 bytes) for all columns. Grad err: max over the 10 gradients of max|g - g_fp32| / "
            "max|g_fp32|, g_fp32 from eager fp32 on the same values." + compile_note + " Torch "
            f"{torch.__version__}. Written by `python benchmarks/kernels.py`.\n\n" + head + "\n" + "\n".join(table)
            + "\n\nTargets: " + "; ".join(lines) + ".")
    print(body)
    if not args.no_write:
        write_section("kernels", body)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak": [peak_key, peak_tflops, peak_tbs],
                                               "compile": mode, "rows": rows, "targets": targets,
                                               "target_lines": lines},
                                              indent=1, default=float))


def run_cpu(args) -> None:
    torch.set_num_threads(args.threads)
    variants = {"reference (F.conv1d)": residual_block_reference, "shifted (K matmuls)": residual_block_shifted,
                "gemm (1 wide GEMM)": residual_block_gemm}
    shapes = ([(32, 50, 64), (8, 50, 256)] if args.quick else
              [(64, 50, 64), (16, 200, 64), (16, 50, 256), (4, 200, 256), (4, 50, 512)])
    if not args.no_compile:
        import tempfile

        import torch._dynamo as dynamo

        # A fresh inductor cache, so the reported compile times are what a new machine pays
        # (a warm on-disk cache brings them down to ~0.2-5 s).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-kernels-bench-")

        dynamo.config.cache_size_limit = max(16, dynamo.config.cache_size_limit)
        variants["torch.compile(reference)"] = torch.compile(residual_block_reference, dynamic=False)
    load0 = os.getloadavg()[0]
    results, compile_s = {}, {}
    for shape in shapes:
        blk = make_block(*shape, torch.float32, "cpu")
        ref_grads = _step(residual_block_reference, *blk)
        for name, fn in variants.items():
            t0 = time.perf_counter()
            grads = _step(fn, *blk)  # warm-up; for torch.compile this is the compile
            if name.startswith("torch.compile"):
                compile_s[shape] = time.perf_counter() - t0
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)
        # Rounds interleave the variants so that load from other processes hits them alike. Two
        # clocks: wall (min over rounds = least disturbed) and this process's CPU time, which a
        # shared machine inflates much less (descheduled time is not counted).
        wall = {name: [] for name in variants}
        cpu = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.iters):
                    _step(fn, *blk)
                wall[name].append((time.perf_counter() - w0) / args.iters * 1e3)
                cpu[name].append((time.process_time() - c0) / args.iters * 1e3)
        results[shape] = {n: (min(wall[n]), statistics.median(wall[n]), min(cpu[n])) for n in variants}
        ref_w, ref_c = results[shape]["reference (F.conv1d)"][0], results[shape]["reference (F.conv1d)"][2]
        print(f"B={shape[0]} L={shape[1]} C={shape[2]}: " + ", ".join(
            f"{n} wall {w:.2f} ms (x{ref_w / w:.2f}) cpu {c:.2f} ms (x{ref_c / c:.2f})"
            for n, (w, _, c) in results[shape].items()), flush=True)
    load1 = os.getloadavg()[0]
    names = list(variants)
    head = "| B | L | C | " + " | ".join(names) + " |\n|" + "---|" * (3 + len(names))
    lines = []
    for shape, res in results.items():
        ref_w, ref_c = res["reference (F.conv1d)"][0], res["reference (F.conv1d)"][2]
        cells = [f"{w:.1f} / {md:.1f} / {c:.1f} (x{ref_w / w:.2f} / x{ref_c / c:.2f})"
                 for w, md, c in (res[n] for n in names)]
        lines.append(f"| {shape[0]} | {shape[1]} | {shape[2]} | " + " | ".join(cells) + " |")
    comp = ""
    if compile_s:
        comp = ("\n\ntorch.compile first call (compile + run, fwd+bwd; empty inductor cache) per shape: "
                + ", ".join(f"{s[0]}x{s[1]}x{s[2]}: {t:.1f} s" for s, t in compile_s.items()) + ".")
    body = (f"## Kernels (CPU)\n\nResidual block forward + backward on CPU, fp32, dilation {DILATION}, "
            f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}. "
            f"Cells: wall min / wall median / CPU-time min, ms per step, over {args.rounds} interleaved "
            f"rounds of {args.iters} steps; in brackets the speedup vs the reference (wall min / CPU-time "
            f"min). The machine was shared (load average {load0:.1f} at "
            f"start, {load1:.1f} at end), so read ratios, not absolute ms. Written by "
            f"`python benchmarks/kernels.py --cpu`; the decision is in docs/kernels.md.\n\n"
            + head + "\n" + "\n".join(lines) + comp)
    print(body)
    if not args.no_write:
        write_section("kernels-cpu", body)


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected BxLxC[,BxLxC...], got {text!r}")
    return shapes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="time the CPU variants instead of the GPU kernels")
    ap.add_argument("--quick", action="store_true", help="two shapes only (smoke run)")
    ap.add_argument("--reps", type=int, default=50, help="GPU: timed fwd+bwd repetitions")
    ap.add_argument("--warmup", type=int, default=10, help="GPU: untimed repetitions first")
    ap.add_argument("--threads", type=int, default=2, help="CPU: torch threads")
    ap.add_argument("--rounds", type=int, default=7, help="CPU: interleaved timing rounds")
    ap.add_argument("--iters", type=int, default=5, help="CPU: steps per round")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (CPU; on GPU: --compile off)")
    ap.add_argument("--compile", choices=("static", "dynamic", "off"), default="static",
                    help="GPU: torch.compile of eager, one compile per shape (static), one for all (dynamic), or none")
    ap.add_argument("--shapes", type=_shapes, help="GPU: BxLxC,BxLxC,... instead of the default grid")
    ap.add_argument("--compile-shapes", type=_shapes, help="GPU: time torch.compile at these shapes only (BxLxC,...)")
    ap.add_argument("--json", help="GPU: also write rows and targets to this JSON file (scripts/gpu_check.sh)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    run_cpu(args) if args.cpu else run_gpu(args)


if __name__ == "__main__":
    main()
