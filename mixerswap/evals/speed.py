"""Prefill and decode speed, latency and memory of several models in one run, with ratios.

For each model, batch size ``B`` and context length ``L`` (one *configuration*): a prefill of
``B x L`` random tokens that builds the cache (logits kept for the last position only), then
``decode_tokens`` greedy decode steps of ``B`` tokens through that cache, each timed on its own.
On CUDA, ``warmup`` untimed repetitions come first and times are CUDA events; on CPU, wall clock.
A configuration that runs out of memory is recorded with status ``"oom"`` and the run goes on;
longer contexts of the same model and batch are then recorded as ``"oom"`` without being tried.

JSON written by :meth:`BenchReport.to_dict` (``mixerswap bench --json``), ``schema`` 1:

- ``schema``, ``created`` (ISO time), ``versions`` (mixerswap, torch, transformers)
- ``device`` (e.g. ``cuda:0``), ``device_name``, ``dtype``, ``timing`` (``cuda_events`` | ``wall_clock``),
  ``warmup``, ``decode_tokens``, ``prefill_chunk`` (tokens per prefill forward, null: whole prompt),
  ``reference`` (model the ratios divide by, or null)
- ``memory_kind``: what ``peak_memory_bytes`` measures: ``cuda_max_allocated`` (bytes allocated on
  the device during the configuration, weights included) or ``cpu_peak_rss`` (peak resident set of
  the whole process, weights and Python included), or ``unavailable``
- ``kernels``: ``requested`` (``MIXERSWAP_KERNELS``) and ``ops`` (operator → backend that ran)
- ``models``: name → ``path``, ``kind`` (``student`` | ``teacher``), ``plan`` (layer kinds),
  ``parameters``, ``attn_implementation``
- ``runs``: one per configuration: ``model``, ``batch``, ``context``, ``status`` (``ok`` | ``oom``),
  ``prefill_seconds``, ``prefill_tokens_per_s`` (B·L / prefill time), ``decode_tokens_per_s``
  (B·steps / decode time), ``decode_latency_ms_p50``, ``decode_latency_ms_p90`` (per decode step),
  ``peak_memory_bytes``, ``cache_bytes`` (cache after prefill and decode), ``error`` (on ``oom``)
- ``ratios``: per other model, batch and context where both ran: ``model``, ``batch``, ``context``,
  ``prefill_speedup`` and ``decode_speedup`` (model tokens/s ÷ reference tokens/s),
  ``cache_reduction`` (reference cache bytes ÷ model cache bytes), ``peak_memory_ratio`` (model ÷ reference)
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__, kernels
from ..architectures.cache import cache_nbytes
from ..architectures.mixers import registered_kinds
from .lengths import check_lengths
from .tables import format_table

SCHEMA = 1
OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")


@dataclass
class BenchRun:
    model: str
    batch: int
    context: int
    status: str = "ok"
    prefill_seconds: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_latency_ms_p50: float | None = None
    decode_latency_ms_p90: float | None = None
    peak_memory_bytes: int | None = None
    cache_bytes: int | None = None
    error: str | None = None


@dataclass
class BenchReport:
    device: str
    device_name: str
    dtype: str
    timing: str
    warmup: int
    decode_tokens: int
    memory_kind: str
    kernels: dict
    reference: str | None = None
    prefill_chunk: int | None = None
    models: dict = field(default_factory=dict)
    runs: list[BenchRun] = field(default_factory=list)

    def run(self, model: str, batch: int, context: int) -> BenchRun | None:
        return next((r for r in self.runs if (r.model, r.batch, r.context) == (model, batch, context)), None)

    def ratios(self) -> list[dict]:
        if self.reference is None:
            return []
        out = []
        for r in self.runs:
            ref = self.run(self.reference, r.batch, r.context)
            if r.model == self.reference or r.status != "ok" or ref is None or ref.status != "ok":
                continue
            out.append({
                "model": r.model, "batch": r.batch, "context": r.context,
                "prefill_speedup": _ratio(r.prefill_tokens_per_s, ref.prefill_tokens_per_s),
                "decode_speedup": _ratio(r.decode_tokens_per_s, ref.decode_tokens_per_s),
                "cache_reduction": _ratio(ref.cache_bytes, r.cache_bytes),
                "peak_memory_ratio": _ratio(r.peak_memory_bytes, ref.peak_memory_bytes),
            })
        return out

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "device": self.device, "device_name": self.device_name, "dtype": self.dtype,
            "timing": self.timing, "warmup": self.warmup, "decode_tokens": self.decode_tokens,
            "prefill_chunk": self.prefill_chunk,
            "reference": self.reference, "memory_kind": self.memory_kind, "kernels": self.kernels,
            "models": self.models, "runs": [asdict(r) for r in self.runs], "ratios": self.ratios(),
        }

    def table(self) -> str:
        ratios = {(q["model"], q["batch"], q["context"]): q for q in self.ratios()}
        headers = ["model", "batch", "context", "status", "prefill tok/s", "decode tok/s", "p50 ms", "p90 ms",
                   "cache MiB", "peak MiB"]
        if self.reference:
            headers += ["prefill x", "decode x", "cache ÷"]
        rows = []
        for r in self.runs:
            row = [r.model, r.batch, r.context, r.status, r.prefill_tokens_per_s, r.decode_tokens_per_s,
                   r.decode_latency_ms_p50, r.decode_latency_ms_p90, _mib(r.cache_bytes), _mib(r.peak_memory_bytes)]
            if self.reference:
                q = ratios.get((r.model, r.batch, r.context), {})
                row += [q.get("prefill_speedup"), q.get("decode_speedup"), q.get("cache_reduction")]
            rows.append(row)
        return format_table(headers, rows)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _mib(n):
    return None if n is None else n / 2**20


def _versions() -> dict:
    import transformers

    return {"mixerswap": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def is_oom(err: BaseException) -> bool:
    """True for CUDA out-of-memory errors and for allocation failures on the CPU."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MESSAGES)


class _Clock:
    """Seconds between ``start`` and ``stop``: CUDA events on a GPU (read after sync), else wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, begin, end) -> float:
        if self.cuda:
            end.synchronize()
            return begin.elapsed_time(end) / 1000.0
        return end - begin

    stop = start


class _PeakMemory:
    """Peak memory of one configuration: CUDA allocator statistics, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "cpu_peak_rss" if self._reset_rss() else "unavailable"

    @staticmethod
    def _reset_rss() -> bool:
        try:  # "5" resets the VmHWM high-water mark of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            self._reset_rss()

    def peak(self) -> int | None:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "cpu_peak_rss":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None


def kernel_ops() -> list[str]:
    """The operators the registered mixer kinds declare they call (``Mixer.kernel_ops``)."""
    return sorted({op for kind in registered_kinds().values() for op in kind.module.kernel_ops})


def kernel_backends(device: torch.device, dtype: torch.dtype) -> dict:
    """Which backend each mixer operator resolves to for inference tensors of ``device`` and ``dtype``."""
    probe = torch.empty(1, device=device, dtype=dtype)
    return {"requested": kernels.requested_backend(), "ops": {op: kernels.resolve(op, probe)[0] for op in kernel_ops()}}


def describe_model(model, path: str | None = None) -> dict:
    config = model.config
    plan = config.layer_kinds() if hasattr(config, "layer_kinds") else ["attention"] * config.num_hidden_layers
    return {"path": path or getattr(model, "name_or_path", None) or None,
            "kind": "student" if hasattr(config, "plan") else "teacher", "plan": plan,
            "parameters": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(config, "_attn_implementation", None)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _prefill_and_decode(model, ids: torch.Tensor, steps: int, clock: _Clock, chunk: int | None = None):
    """Returns ``(prefill_seconds, [decode step seconds], cache)``; ``ids`` is ``[B, L]``.

    ``chunk``: prefill that many tokens per forward, through the cache (None: all at once).
    """
    cache = None
    begin = clock.start()
    for start in range(0, ids.shape[1], chunk or ids.shape[1]):
        out = model(ids[:, start : start + (chunk or ids.shape[1])], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache = out.past_key_values
    end = clock.stop()
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    marks = []
    for _ in range(steps):
        step_begin = clock.start()
        out = model(next_ids, past_key_values=cache, use_cache=True)
        marks.append((step_begin, clock.stop()))
        cache = out.past_key_values
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = clock.elapsed(begin, end)
    return prefill, [clock.elapsed(b, e) for b, e in marks], cache


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _free(device: torch.device) -> None:
    """Return cached CUDA blocks between configurations (on CPU, dropping references already frees)."""
    if device.type == "cuda":
        gc.collect()  # reference cycles (e.g. from a caught OOM's traceback) may still hold tensors
        torch.cuda.empty_cache()


def bench(models: Mapping[str, torch.nn.Module | Callable[[], torch.nn.Module]], *, contexts: list[int],
          batches: list[int], decode_tokens: int = 32, reference: str | None = None, warmup: int | None = None,
          prefill_chunk: int | None = None, max_memory_bytes: int | None = None, seed: int = 0,
          echo: Callable[[str], None] | None = None) -> BenchReport:
    """Measure every model at every ``(batch, context)``; see the module docstring.

    Args:
        models: name → model, or → zero-argument loader (the model is then loaded for its turn
            only and freed after it, so large models need not fit together). Models share one device.
        reference: name of the model that ratios divide by (e.g. the teacher).
        warmup: untimed repetitions per configuration (default: 1 on CUDA, 0 on CPU).
        prefill_chunk: prefill this many tokens per forward through the cache (default: the whole
            prompt at once); long prompts at large batch need it to fit activations in memory.
        max_memory_bytes: CUDA only: cap this process's allocations (a smaller GPU); running over
            it is recorded as ``oom``.
    """
    if not models:
        raise ValueError("nothing to benchmark")
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models: {', '.join(models)}")
    if decode_tokens < 1:
        raise ValueError("decode_tokens must be at least 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1 token")
    contexts, batches = sorted(set(contexts)), sorted(set(batches))
    report = None
    for name, source in models.items():
        model = source() if callable(source) and not isinstance(source, torch.nn.Module) else source
        check_lengths(model, contexts, extra=decode_tokens, what="bench context")
        device, dtype = model.device, model.dtype
        if report is None:
            report = _new_report(device, dtype, warmup, decode_tokens, reference, prefill_chunk)
            _cap_memory(device, max_memory_bytes)
        report.models[name] = describe_model(model)
        peak = _PeakMemory(device)
        for batch in batches:
            oom_at = None
            for context in contexts:
                if oom_at is not None:
                    report.runs.append(BenchRun(name, batch, context, "oom",
                                                error=f"skipped: out of memory at context {oom_at}"))
                    continue
                run = _measure(model, name, batch, context, report, peak, seed)
                report.runs.append(run)
                if echo:
                    echo(f"{name} batch {batch} context {context}: {run.status}")
                if run.status == "oom":
                    oom_at = context
        del model
        _free(device)
    _cap_memory(torch.device(report.device), None)
    return report


def _new_report(device, dtype, warmup, decode_tokens, reference, prefill_chunk) -> BenchReport:
    cuda = device.type == "cuda"
    return BenchReport(
        device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
        dtype=str(dtype).removeprefix("torch."), timing="cuda_events" if cuda else "wall_clock",
        warmup=(1 if cuda else 0) if warmup is None else warmup, decode_tokens=decode_tokens,
        memory_kind=_PeakMemory(device).kind, kernels=kernel_backends(device, dtype), reference=reference,
        prefill_chunk=prefill_chunk)


def _cap_memory(device: torch.device, max_memory_bytes: int | None) -> None:
    if max_memory_bytes is None and device.type != "cuda":
        return
    if device.type != "cuda":
        raise ValueError("max_memory_bytes needs a CUDA device (it caps the CUDA allocator)")
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if max_memory_bytes is None else min(1.0, max_memory_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def _measure(model, name, batch, context, report: BenchReport, peak: _PeakMemory, seed: int) -> BenchRun:
    device = model.device
    gen = torch.Generator().manual_seed(seed + context * 7919 + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    clock = _Clock(device)
    try:
        for _ in range(report.warmup):
            _prefill_and_decode(model, ids, min(2, report.decode_tokens), clock, report.prefill_chunk)
        _free(device)
        peak.reset()
        _synchronize(device)
        prefill, steps, cache = _prefill_and_decode(model, ids, report.decode_tokens, clock, report.prefill_chunk)
        _synchronize(device)
        run = BenchRun(
            name, batch, context, "ok", prefill_seconds=prefill,
            prefill_tokens_per_s=batch * context / prefill if prefill > 0 else None,
            decode_tokens_per_s=batch * len(steps) / sum(steps) if sum(steps) > 0 else None,
            decode_latency_ms_p50=1000 * statistics.median(steps),
            decode_latency_ms_p90=1000 * _percentile(steps, 0.9),
            peak_memory_bytes=peak.peak(), cache_bytes=cache_nbytes(cache))
        del cache
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        run = BenchRun(name, batch, context, "oom", error=" ".join(str(err).split())[:200])
    del ids
    _free(device)
    return run


def bench_paths(paths: Mapping[str, str], *, contexts: list[int], decode_tokens: int = 32, dtype: str = "auto",
                device: str | None = None, **kwargs) -> BenchReport:
    """:func:`bench` on model folders (label → path), each loaded for its turn; lengths checked before loading."""
    from .loading import load_config, load_model

    for path in paths.values():
        check_lengths(load_config(path), contexts, extra=decode_tokens, what="bench context")
    loaders = {name: functools.partial(lambda p: load_model(p, dtype=dtype, device=device)[0], path)
               for name, path in paths.items()}
    report = bench(loaders, contexts=contexts, decode_tokens=decode_tokens, **kwargs)
    for name, path in paths.items():
        report.models[name]["path"] = path
    return report


def save_report(report: BenchReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=1))
    return path
