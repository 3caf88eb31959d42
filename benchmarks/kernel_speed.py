"""Our Triton kernels on a GPU: correctness at real sizes (forward and backward), then timings against the
reference and third-party kernels, with achieved throughput against measured ceilings.

    python benchmarks/kernel_speed.py                       # every op, default shapes (about 10 min on an H100)
    python benchmarks/kernel_speed.py --ops ssd_chunk_scan,gla_chunk --seqlens 2048,8192 --check-only

Needs CUDA and triton. Third-party comparisons run when their packages import: mamba-ssm
(``mamba_chunk_scan_combined``; its 2.3.x ``__init__`` imports the compiled Mamba-1 extension, so this
harness — only this harness — puts an empty ``selective_scan_cuda`` module on the path first: install
mamba-ssm with ``MAMBA_SKIP_CUDA_BUILD=TRUE``), causal-conv1d, fla (``chunk_simple_gla``,
``chunk_gated_delta_rule``), and PyTorch's SDPA flash attention as the attention baseline.

Timings are CUDA-event medians over ``--repeats`` runs after ``--warmup`` runs. Ceilings: device copy
bandwidth (a 1 GiB ``copy_``) and the bf16 matmul rate (8192³). Model FLOPs of the chunked ops are
counted from their algorithms: SSD ``2·B·H·T·(Q·(N+P) + 2·N·P)`` with chunk ``Q``; GLA and the delta rule
the same with ``K`` for ``N`` and ``V`` for ``P`` (the delta rule adds the ``Q·K`` WY work once more);
attention ``4·B·H·T²·D / 2`` (causal). Decode steps are bandwidth-bound: bytes = state read + written
+ inputs. Writes ``benchmarks/results/kernels-<device>.json`` and prints tables; ``RESULTS.md``
records them with the command.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from mixerswap import kernels
from mixerswap.kernels import use_backend

RESULTS = Path(__file__).parent / "results"
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1 and tiny --check-shapes) tries the harness on CPU
OPS = ("ssd_chunk_scan", "causal_conv1d", "gla_chunk", "delta_rule_chunk", "gated_rmsnorm")
# largest relative error (output and every gradient) against the torch reference run on the same inputs:
# fp32 kernels accumulate in fp32 like the reference; in bf16 both round their inputs and outputs
CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}
STEPS = ("ssd_step", "causal_conv1d_step", "gla_step", "delta_rule_step")


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings(warmup: int, repeats: int) -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), warmup, repeats)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = cuda_time(lambda: a @ a, warmup, repeats)
    return {"copy_GBps": round(2 * src.numel() / ms / 1e6, 1), "bf16_matmul_TFLOPs": round(2 * 8192**3 / mm / 1e9, 1)}


def third_party() -> dict:
    found = {}
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # harness only
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        found["mamba_ssm"] = mamba_chunk_scan_combined
    except Exception as err:
        print(f"mamba_ssm unavailable: {err}")
    try:
        from causal_conv1d import causal_conv1d_fn

        found["causal_conv1d"] = causal_conv1d_fn
    except Exception as err:
        print(f"causal_conv1d unavailable: {err}")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla

        found["fla_gla"], found["fla_delta"] = chunk_simple_gla, chunk_gated_delta_rule
    except Exception as err:
        print(f"fla unavailable: {err}")
    return found


def make_inputs(op: str, B: int, T: int, H: int, D: int, N: int, dtype, grad: bool) -> dict:
    """Random inputs of each op in its documented layout; gates and decays in realistic ranges."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=DEVICE, generator=g, dtype=torch.float32) * scale).to(dt).requires_grad_(grad)

    if op == "ssd_chunk_scan":
        dt = F.softplus(torch.randn(B, T, H, device=DEVICE, generator=g) - 2).to(dtype).requires_grad_(grad)
        A = (-torch.rand(H, device=DEVICE, generator=g) - 0.5).requires_grad_(grad)
        return {"x": r(B, T, H, D), "dt": dt, "A": A, "B": r(B, T, H, N, scale=N**-0.5), "C": r(B, T, H, N, scale=N**-0.5),
                "chunk_size": 64, "D": r(H, dt=torch.float32)}
    if op == "causal_conv1d":
        return {"x": r(B, T, H * D), "weight": r(H * D, 4, scale=0.5), "bias": r(H * D), "activation": "silu"}
    if op == "gated_rmsnorm":
        return {"y": r(B * T, H * D), "z": r(B * T, H * D), "weight": r(H * D), "group_size": D, "eps": 1e-6}
    logsig = lambda: F.logsigmoid(torch.randn(B, T, H, device=DEVICE, generator=g) + 4).to(dtype).requires_grad_(grad)  # noqa: E731
    k = F.normalize(torch.randn(B, T, H, N, device=DEVICE, generator=g), dim=-1).to(dtype).requires_grad_(grad)
    common = {"q": r(B, T, H, N, scale=N**-0.5), "k": k, "v": r(B, T, H, D), "g": logsig()}
    if op == "gla_chunk":
        return {**common, "scale": 1.0, "chunk_size": 64}
    beta = torch.sigmoid(torch.randn(B, T, H, device=DEVICE, generator=g)).to(dtype).requires_grad_(grad)
    return {**common, "beta": beta, "chunk_size": 64, "scale": N**-0.5}


def run_ours(op: str, inputs: dict, backend: str):
    args = {k: v for k, v in inputs.items()}
    with use_backend(backend, op=op):
        return getattr(kernels, op)(**args)


def run_third(op: str, inputs: dict, fns: dict):
    """The third-party kernel for ``op`` on the same inputs, or None."""
    if op == "ssd_chunk_scan" and "mamba_ssm" in fns:
        return lambda: fns["mamba_ssm"](inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"],
                                        chunk_size=inputs["chunk_size"], D=inputs["D"])
    if op == "causal_conv1d" and "causal_conv1d" in fns:
        x = inputs["x"].transpose(1, 2)
        return lambda: fns["causal_conv1d"](x, inputs["weight"], inputs["bias"], activation="silu")
    if op == "gla_chunk" and "fla_gla" in fns:
        return lambda: fns["fla_gla"](inputs["q"], inputs["k"], inputs["v"], g=inputs["g"], scale=inputs["scale"])
    if op == "delta_rule_chunk" and "fla_delta" in fns:
        return lambda: fns["fla_delta"](inputs["q"], inputs["k"], inputs["v"], g=inputs["g"], beta=inputs["beta"],
                                        scale=inputs["scale"])
    return None


def first(out):
    return out[0] if isinstance(out, tuple) else out


def flops(op: str, B: int, T: int, H: int, D: int, N: int, Q: int = 64) -> float:
    if op in ("ssd_chunk_scan", "gla_chunk"):
        return 2 * B * H * T * (Q * (N + D) + 2 * N * D)
    if op == "delta_rule_chunk":
        return 2 * B * H * T * (Q * (2 * N + D) + 2 * N * D + N * D)
    return 0.0


def bytes_moved(inputs: dict, out) -> int:
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)] + [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def check(op: str, shape: tuple, dtype, backend: str = "triton") -> dict:
    """``backend`` (ours, or a third-party one through its adapter) against the reference at a real size:
    max relative error of the output and every gradient."""
    B, T, H, D, N = shape
    inputs = make_inputs(op, B, T, H, D, N, dtype, grad=True)
    results = {}
    for name in (backend, "torch"):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                v.grad = None
        out = first(run_ours(op, inputs, name))
        out.float().square().mean().backward()
        results[name] = [out.detach().float()] + [v.grad.float() for v in inputs.values()
                                                  if isinstance(v, torch.Tensor) and v.grad is not None]
    errors = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(results[backend], results["torch"])]
    return {"op": op, "backend": backend, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "rel_err_out": errors[0], "rel_err_grads_max": max(errors[1:]) if len(errors) > 1 else None,
            "finite": all(math.isfinite(e) for e in errors)}


def bench_chunked(op: str, shape: tuple, fns: dict, args) -> list[dict]:
    B, T, H, D, N = shape
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        inputs = make_inputs(op, B, T, H, D, N, torch.bfloat16, grad)
        candidates = {"triton": lambda: run_ours(op, inputs, "triton")}
        if T <= args.reference_max_len:
            candidates["torch"] = lambda: run_ours(op, inputs, "torch")
        third = run_third(op, inputs, fns)
        if third is not None:
            candidates["third_party"] = third
        for name, fn in candidates.items():
            def step(fn=fn):
                out = first(fn())
                if grad:
                    out.float().sum().backward()
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first_call = time.perf_counter() - started
            try:
                ms = cuda_time(step, args.warmup, args.repeats)
            except torch.OutOfMemoryError:
                continue
            f = flops(op, B, T, H, D, N) * (3 if grad else 1)
            rows.append({"op": op, "mode": mode, "backend": name, "B": B, "T": T, "H": H, "D": D, "N": N, "ms": round(ms, 4),
                         "TFLOPs": round(f / ms / 1e9, 2) if f else None,
                         "GBps": round(bytes_moved(inputs, None) / ms / 1e6, 1), "first_call_s": round(first_call, 2)})
    return rows


def bench_attention(shape: tuple, args) -> list[dict]:
    B, T, H, D, _ = shape
    rows = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for mode in ("fwd", "fwd+bwd"):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd") for _ in range(3))

        def step():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if mode != "fwd":
                out.float().sum().backward()
        ms = cuda_time(step, args.warmup, args.repeats)
        f = 2 * B * H * T * T * D * (3 if mode != "fwd" else 1)
        rows.append({"op": "sdpa_flash", "mode": mode, "backend": "torch", "B": B, "T": T, "H": H, "D": D, "N": None,
                     "ms": round(ms, 4), "TFLOPs": round(f / ms / 1e9, 2), "GBps": None, "first_call_s": None})
    return rows


def bench_steps(batch: int, H: int, D: int, N: int, args) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    calls = {
        "ssd_step": lambda: (torch.zeros(batch, H, D, N, device="cuda"), r(batch, H, D), F.softplus(r(batch, H)),
                             -torch.rand(H, device="cuda"), r(batch, H, N), r(batch, H, N), torch.ones(H, device="cuda")),
        "gla_step": lambda: (torch.zeros(batch, H, N, D, device="cuda"), r(batch, H, N), r(batch, H, N), r(batch, H, D),
                             F.logsigmoid(r(batch, H) + 4), 1.0),
        "delta_rule_step": lambda: (torch.zeros(batch, H, N, D, device="cuda"), r(batch, H, N),
                                    F.normalize(r(batch, H, N).float(), dim=-1).bfloat16(), r(batch, H, D),
                                    F.logsigmoid(r(batch, H) + 4), torch.sigmoid(r(batch, H)), N**-0.5),
    }
    rows = []
    for op, make in calls.items():
        inputs = make()
        state = inputs[0]
        for backend in ("triton", "torch"):
            fn = lambda backend=backend: run_positional(op, inputs, backend)  # noqa: E731
            ms = cuda_time(fn, args.warmup, args.repeats)
            moved = 2 * state.numel() * state.element_size() + sum(
                t.numel() * t.element_size() for t in inputs[1:] if isinstance(t, torch.Tensor))
            rows.append({"op": op, "backend": backend, "batch": batch, "H": H, "D": D, "N": N, "ms": round(ms, 4),
                         "GBps": round(moved / ms / 1e6, 1)})
    conv_state = torch.zeros(batch, H * D, 3, device="cuda", dtype=torch.bfloat16)
    x, w = r(batch, H * D), r(H * D, 4)
    for backend in ("triton", "torch"):
        with use_backend(backend, op="causal_conv1d_step"):
            ms = cuda_time(lambda: kernels.causal_conv1d_step(x, conv_state, w, None, activation="silu"),
                           args.warmup, args.repeats)
        moved = 2 * conv_state.numel() * 2 + 2 * x.numel() * 2 + w.numel() * 2
        rows.append({"op": "causal_conv1d_step", "backend": backend, "batch": batch, "H": H, "D": D, "N": None,
                     "ms": round(ms, 4), "GBps": round(moved / ms / 1e6, 1)})
    return rows


def run_positional(op: str, inputs: tuple, backend: str):
    with use_backend(backend, op=op):
        return getattr(kernels, op)(*inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seqlens", default="2048,8192,32768")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--decode-batches", default="64,256")
    parser.add_argument("--reference-max-len", type=int, default=8192, help="skip the torch reference above this")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--check-shapes", default="2x2048x16x64x64,1x4096x8x128x128", help="BxTxHxDxN,...")
    parser.add_argument("--device", default="cuda", help="cpu only with --check-only under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_speed.py needs a CUDA device (or --device cpu --check-only with TRITON_INTERPRET=1)")
    if DEVICE != "cuda" and not args.check_only:
        raise SystemExit("timings need CUDA; on CPU only --check-only runs")
    ops = args.ops.split(",")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu"
    import triton

    report = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    shapes = [tuple(map(int, s.split("x"))) for s in args.check_shapes.split(",")]
    dtypes = (torch.float32, torch.bfloat16) if DEVICE == "cuda" else (torch.float32,)
    # ours, and the third-party kernels through our adapters (same contract) where their packages imported
    checked = {op: [b for b in kernels.registered(op) if b != "torch" and (DEVICE == "cuda" or b == "triton")]
               for op in ops}
    out = args.out or RESULTS / f"kernels-{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["checks"] = []
    for op, backend, dtype, shape in [(op, b, d, s) for op in ops for b in checked[op] for d in dtypes for s in shapes]:
        try:
            c = check(op, shape, dtype, backend)
        except Exception as err:  # e.g. a kernel that does not fit this GPU: record it, check the others
            c = {"op": op, "backend": backend, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                 "error": f"{type(err).__name__}: {err}"}
        c["ok"] = "error" not in c and c["finite"] and max(c["rel_err_out"], c["rel_err_grads_max"] or 0) <= (
            CHECK_TOLERANCE[c["dtype"]])
        report["checks"].append(c)
        detail = c.get("error") or (f"out {c['rel_err_out']:.2e}, grads "
                                    + ("n/a" if c["rel_err_grads_max"] is None else f"{c['rel_err_grads_max']:.2e}"))
        print(f"{'ok  ' if c['ok'] else 'FAIL'} check {op:<18} {backend:<14} {c['dtype']:<9} {shape}: {detail}",
              flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # kept if the run is stopped part way
    if not args.check_only:
        report["ceilings"] = ceilings(args.warmup, args.repeats)
        print(f"ceilings: {report['ceilings']}")
        fns = third_party()
        rows = []
        for B in map(int, args.batches.split(",")):
            for T in map(int, args.seqlens.split(",")):
                for D in map(int, args.head_dims.split(",")):
                    shape = (B, T, args.heads, D, args.state)
                    for op in ops:
                        if op in ("ssd_chunk_scan", "gla_chunk", "delta_rule_chunk", "causal_conv1d"):
                            rows += bench_chunked(op, shape, fns, args)
                    rows += bench_attention(shape, args)
                    torch.cuda.empty_cache()
        report["chunked"] = rows
        report["decode"] = [row for b in map(int, args.decode_batches.split(","))
                            for row in bench_steps(b, args.heads, 64, args.state, args)]
        print(f"{'op':<18}{'mode':<9}{'backend':<12}{'B':>3}{'T':>7}{'D':>5}{'ms':>10}{'TFLOP/s':>9}{'first s':>9}")
        for r in rows:
            print(f"{r['op']:<18}{r['mode']:<9}{r['backend']:<12}{r['B']:>3}{r['T']:>7}{r['D']:>5}{r['ms']:>10.3f}"
                  f"{r['TFLOPs'] or 0:>9.1f}{r['first_call_s'] or 0:>9.2f}")
        for r in report["decode"]:
            print(f"decode {r['op']:<20}{r['backend']:<8} batch {r['batch']:>4}: {r['ms']:.4f} ms, {r['GBps']} GB/s "
                  f"({r['GBps'] / report['ceilings']['copy_GBps']:.0%} of copy)")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    failed = [c for c in report["checks"] if not c["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(report['checks'])} kernel checks failed (tolerances {CHECK_TOLERANCE})")


if __name__ == "__main__":
    main()
