"""Prefill and decode speed, latency and memory of several models in one run, with ratios.

For each model, batch size ``B`` and context length ``L`` (one *configuration*): a prefill of
``B x L`` random tokens that builds the cache (logits kept for the last position only), then
``decode_tokens`` greedy decode steps of ``B`` tokens through that cache, each timed on its own.
Every configuration runs ``warmup`` untimed times (first calls pay for lazy initialization), then
``repeats`` timed times; throughputs are medians over the repeats with their min and max.
*Interleaved* (the default on CPU): the models take turns within each configuration, one timed repeat
each per round, and a ratio is the median of the per-round ratios, so a machine that drifts (frequency,
other processes) moves both sides of every ratio alike; otherwise (the default on CUDA, where each
model is loaded for its turn only) ratios are ratios of medians. Times are CUDA events on a GPU; on
CPU, wall clock or (``timing="cpu"``) the CPU time of this process, which other processes on a shared
machine do not inflate.
A configuration that runs out of memory is recorded with status ``"oom"`` and the run goes on;
longer contexts of the same model and batch are then recorded as ``"oom"`` without being tried.

On CPU the mixers run on the torch reference kernels (plain PyTorch, written to be checked against,
not to be fast); ``BenchReport.notes`` says so whenever a reference kernel ran.

JSON written by :meth:`BenchReport.to_dict` (``mixerswap bench --json``), ``schema`` 3:

- ``schema``, ``created`` (ISO time), ``versions`` (mixerswap, torch, transformers)
- ``device`` (e.g. ``cuda:0``), ``device_name``, ``dtype``, ``timing`` (``cuda_events`` | ``wall_clock`` |
  ``process_cpu_time``), ``warmup``, ``repeats``, ``decode_tokens``, ``prefill_chunk`` (tokens per prefill
  forward, null: whole prompt), ``reference`` (model the ratios divide by, or null), ``interleaved``
  (models took turns within each configuration)
- ``memory_kind``: what ``peak_memory_bytes`` measures: ``cuda_max_allocated`` (bytes allocated on
  the device during the configuration, weights and activations included) or ``model_and_cache``
  (CPU: bytes of the model's parameters and buffers plus its cache; activations are not counted)
- ``kernels``: ``requested`` (``MIXERSWAP_KERNELS``) and ``ops`` (operator → backend that ran)
- ``reference_kernels``: the operators the models' mixers call that ran on the torch reference kernels
- ``models``: name → ``path``, ``kind`` (``student`` | ``teacher``), ``plan`` (layer kinds),
  ``parameters``, ``attn_implementation``
- ``runs``: one per configuration: ``model``, ``batch``, ``context``, ``status`` (``ok`` | ``oom``),
  ``prefill_seconds`` (median), ``prefill_tokens_per_s`` (B·L / prefill time, median over repeats),
  ``prefill_tokens_per_s_min``, ``prefill_tokens_per_s_max``, ``decode_tokens_per_s`` (B·steps / decode
  time, median over repeats), ``decode_tokens_per_s_min``, ``decode_tokens_per_s_max``,
  ``decode_latency_ms_p50``, ``decode_latency_ms_p90`` (per decode step, over all repeats),
  ``peak_memory_bytes``, ``cache_bytes`` (cache after prefill and decode), ``error`` (on ``oom``),
  ``prefill_tokens_per_s_repeats`` and ``decode_tokens_per_s_repeats`` (one value per round when
  interleaved, else null)
- ``ratios``: per other model, batch and context where both ran: ``model``, ``batch``, ``context``,
  ``prefill_speedup`` and ``decode_speedup`` (model tokens/s ÷ reference tokens/s: median of the
  per-round ratios when interleaved, else ratio of medians), ``prefill_speedup_min``,
  ``prefill_speedup_max``, ``decode_speedup_min``, ``decode_speedup_max`` (over the rounds, else the
  widest the min/max of both allow), ``cache_reduction`` (reference cache bytes ÷ model cache
  bytes), ``peak_memory_ratio`` (model ÷ reference)
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
from ..kernels.dispatch import REFERENCE as REFERENCE_BACKEND
from .lengths import check_lengths
from .tables import format_table, format_value

SCHEMA = 3
TIMINGS = ("wall", "cpu")
OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")


@dataclass
class BenchRun:
    model: str
    batch: int
    context: int
    status: str = "ok"
    prefill_seconds: float | None = None
    prefill_tokens_per_s: float | None = None
    prefill_tokens_per_s_min: float | None = None
    prefill_tokens_per_s_max: float | None = None
    decode_tokens_per_s: float | None = None
    decode_tokens_per_s_min: float | None = None
    decode_tokens_per_s_max: float | None = None
    decode_latency_ms_p50: float | None = None
    decode_latency_ms_p90: float | None = None
    peak_memory_bytes: int | None = None
    cache_bytes: int | None = None
    error: str | None = None
    prefill_tokens_per_s_repeats: list[float | None] | None = None
    decode_tokens_per_s_repeats: list[float | None] | None = None


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
    repeats: int = 1
    reference: str | None = None
    prefill_chunk: int | None = None
    interleaved: bool = False
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
                **_speedup("prefill", r, ref), **_speedup("decode", r, ref),
                "cache_reduction": _ratio(ref.cache_bytes, r.cache_bytes),
                "peak_memory_ratio": _ratio(r.peak_memory_bytes, ref.peak_memory_bytes),
            })
        return out

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "device": self.device, "device_name": self.device_name, "dtype": self.dtype,
            "timing": self.timing, "warmup": self.warmup, "repeats": self.repeats, "decode_tokens": self.decode_tokens,
            "prefill_chunk": self.prefill_chunk, "interleaved": self.interleaved,
            "reference": self.reference, "memory_kind": self.memory_kind, "kernels": self.kernels,
            "reference_kernels": self.reference_kernels(),
            "models": self.models, "runs": [asdict(r) for r in self.runs], "ratios": self.ratios(),
        }

    def reference_kernels(self) -> list[str]:
        """Operators the benchmarked mixers call that ran on the torch reference kernels (not meant to be fast)."""
        used = set(kernel_ops({kind for model in self.models.values() for kind in model.get("plan", [])}))
        return sorted(op for op, backend in self.kernels.get("ops", {}).items()
                      if backend == REFERENCE_BACKEND and op in used)

    def notes(self) -> list[str]:
        """What a reader of the table must know: how it was measured, and when reference kernels ran."""
        memory = {"cuda_max_allocated": "peak MiB: CUDA allocations during the configuration",
                  "model_and_cache": "model MiB: parameters, buffers and cache (activations not counted)"}
        lines = [f"{self.device_name} ({self.device}), {self.dtype}; timing {self.timing}, {self.warmup} warm-up and "
                 f"{self.repeats} timed repeat(s) per configuration"
                 + (", models taking turns" if self.interleaved and len(self.models) > 1 else "")
                 + ": tok/s are medians [min-max]"
                 + ("; ratios are medians of per-round ratios" if self.interleaved and self.reference else "")
                 + (f"; {memory[self.memory_kind]}" if self.memory_kind in memory else "")]
        reference = self.reference_kernels()
        if reference:
            lines.append(f"note: {', '.join(reference)} ran on the torch reference kernels (plain PyTorch, written "
                         "to be correct, not fast): their speed here says little about the fused kernels")
        return lines

    def table(self) -> str:
        ratios = {(q["model"], q["batch"], q["context"]): q for q in self.ratios()}
        memory = {"model_and_cache": "model MiB", "cuda_max_allocated": "peak MiB"}.get(self.memory_kind)
        headers = ["model", "batch", "context", "status", "prefill tok/s", "decode tok/s", "p50 ms", "p90 ms",
                   "cache MiB"] + ([memory] if memory else [])
        if self.reference:
            headers += ["prefill x", "decode x", "cache ÷"]
        rows = []
        for r in self.runs:
            row = [r.model, r.batch, r.context, r.status,
                   _spread(r.prefill_tokens_per_s, r.prefill_tokens_per_s_min, r.prefill_tokens_per_s_max),
                   _spread(r.decode_tokens_per_s, r.decode_tokens_per_s_min, r.decode_tokens_per_s_max),
                   r.decode_latency_ms_p50, r.decode_latency_ms_p90, _mib(r.cache_bytes)]
            row += [_mib(r.peak_memory_bytes)] if memory else []
            if self.reference:
                q = ratios.get((r.model, r.batch, r.context), {})
                row += [q.get("prefill_speedup"), q.get("decode_speedup"), q.get("cache_reduction")]
            rows.append(row)
        return format_table(headers, rows)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _speedup(measure: str, run: BenchRun, ref: BenchRun) -> dict:
    """``{measure}_speedup`` with its min and max: from the rounds in which both models ran one repeat
    each when the run was interleaved, else the ratio of medians with the widest bounds min and max allow."""
    key = f"{measure}_tokens_per_s"
    ours, theirs = getattr(run, f"{key}_repeats"), getattr(ref, f"{key}_repeats")
    if ours and theirs and len(ours) == len(theirs):
        rounds = [a / b for a, b in zip(ours, theirs) if a is not None and b]
        if rounds:
            return {f"{measure}_speedup": statistics.median(rounds), f"{measure}_speedup_min": min(rounds),
                    f"{measure}_speedup_max": max(rounds)}
    return {f"{measure}_speedup": _ratio(getattr(run, key), getattr(ref, key)),
            f"{measure}_speedup_min": _ratio(getattr(run, f"{key}_min"), getattr(ref, f"{key}_max")),
            f"{measure}_speedup_max": _ratio(getattr(run, f"{key}_max"), getattr(ref, f"{key}_min"))}


def _mib(n):
    return None if n is None else n / 2**20


def _spread(median, low, high) -> str | None:
    """``1234 [1100-1300]``: a median with its min and max (just the median when they are missing)."""
    if median is None:
        return None
    if low is None or high is None:
        return format_value(median)
    return f"{format_value(median)} [{format_value(low, 3)}-{format_value(high, 3)}]"


def _versions() -> dict:
    import transformers

    return {"mixerswap": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def is_oom(err: BaseException) -> bool:
    """True for CUDA out-of-memory errors and for allocation failures on the CPU."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MESSAGES)


class _Clock:
    """Seconds between ``start`` and ``stop``: CUDA events on a GPU (read after sync), else wall clock
    or, with ``cpu_time``, the CPU time of this process (all its threads)."""

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.cuda = device.type == "cuda"
        self.read = time.process_time if cpu_time else time.perf_counter
        self.kind = "cuda_events" if self.cuda else "process_cpu_time" if cpu_time else "wall_clock"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.read()

    def elapsed(self, begin, end) -> float:
        if self.cuda:
            end.synchronize()
            return begin.elapsed_time(end) / 1000.0
        return end - begin

    stop = start


class _PeakMemory:
    """Memory of one configuration: the CUDA allocator's peak, or on CPU the model's own bytes
    (parameters, buffers and cache; the process's resident size would mostly measure Python and torch)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "model_and_cache"

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, model, cache_bytes: int | None, others: int = 0) -> int:
        """``others``: bytes of other models resident on the device (taken out of the CUDA peak)."""
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) - others
        return model_bytes(model) + (cache_bytes or 0)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (shared tensors counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kernel_ops(kinds: set[str] | None = None) -> list[str]:
    """The operators the registered mixer kinds (or those of ``kinds``) declare they call (``Mixer.kernel_ops``)."""
    return sorted({op for name, kind in registered_kinds().items() if kinds is None or name in kinds
                   for op in kind.module.kernel_ops})


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
          batches: list[int], decode_tokens: int = 32, reference: str | None = None, warmup: int = 1,
          repeats: int = 5, timing: str = "wall", prefill_chunk: int | None = None,
          max_memory_bytes: int | None = None, interleave: bool | None = None, seed: int = 0,
          echo: Callable[[str], None] | None = None,
          on_configuration: Callable[[BenchReport], None] | None = None) -> BenchReport:
    """Measure every model at every ``(batch, context)``; see the module docstring.

    Args:
        models: name → model, or → zero-argument loader. Models share one device.
        reference: name of the model that ratios divide by (e.g. the teacher).
        warmup: untimed repetitions per configuration (a short decode each).
        repeats: timed repetitions per configuration; throughputs are their medians, with min and max.
        timing: on CPU, ``"wall"`` (wall clock) or ``"cpu"`` (CPU time of this process: steadier on a
            shared machine, and it counts every thread's time). CUDA always uses CUDA events.
        prefill_chunk: prefill this many tokens per forward through the cache (default: the whole
            prompt at once); long prompts at large batch need it to fit activations in memory.
        max_memory_bytes: CUDA only: cap this process's allocations (a smaller GPU); running over
            it is recorded as ``oom``.
        interleave: the models take turns within each configuration, one timed repeat each per round,
            so a machine that slows down or speeds up during the run slows every model alike and ratios
            are medians of per-round ratios (all models are loaded at once). ``False``: one model after
            the other, each loaded for its turn only and freed after it (models too large to fit
            together). Default: interleave on CPU, not on CUDA.
        echo: called with one line per model and configuration as it finishes (``"name batch B context L: ok"``).
        on_configuration: called with the report so far after each configuration, e.g. to save it, so that
            a run stopped part way keeps what it measured.
    """
    if not models:
        raise ValueError("nothing to benchmark")
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models: {', '.join(models)}")
    if decode_tokens < 1:
        raise ValueError("decode_tokens must be at least 1")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be at least 1 and warmup at least 0")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1 token")
    contexts, batches = sorted(set(contexts)), sorted(set(batches))
    names = list(models)
    first = _load(models[names[0]], contexts, decode_tokens)
    device, dtype = first.device, first.dtype
    interleave = device.type != "cuda" if interleave is None else interleave
    report = _new_report(device, dtype, warmup, repeats, timing, decode_tokens, reference, prefill_chunk, interleave)
    _cap_memory(device, max_memory_bytes)
    if interleave:
        group = {names[0]: first, **{name: _load(models[name], contexts, decode_tokens) for name in names[1:]}}
        _bench_group(report, group, batches, contexts, seed, echo, on_configuration)
        del group
    else:
        for name in names:
            model = first if name == names[0] else _load(models[name], contexts, decode_tokens)
            first = None
            _bench_group(report, {name: model}, batches, contexts, seed, echo, on_configuration)
            del model
            _free(device)
    _free(device)
    _cap_memory(device, None)
    order = {name: i for i, name in enumerate(names)}
    report.runs.sort(key=lambda r: (order[r.model], r.batch, r.context))
    return report


def _load(source, contexts: list[int], decode_tokens: int) -> torch.nn.Module:
    model = source() if callable(source) and not isinstance(source, torch.nn.Module) else source
    check_lengths(model, contexts, extra=decode_tokens, what="bench context")
    return model


def _bench_group(report: BenchReport, group: dict[str, torch.nn.Module], batches: list[int], contexts: list[int],
                 seed: int, echo: Callable[[str], None] | None,
                 on_configuration: Callable[[BenchReport], None] | None = None) -> None:
    """Every configuration for the models of ``group`` (taking turns when there are several)."""
    for name, model in group.items():
        report.models[name] = describe_model(model)
    for batch in batches:
        oom_at: dict[str, int] = {}
        for context in contexts:
            for name in [n for n in group if n in oom_at]:
                report.runs.append(BenchRun(name, batch, context, "oom",
                                            error=f"skipped: out of memory at context {oom_at[name]}"))
            active = {name: model for name, model in group.items() if name not in oom_at}
            for name, run in _measure(active, batch, context, report, seed).items():
                report.runs.append(run)
                if echo:
                    echo(f"{name} batch {batch} context {context}: {run.status}")
                if run.status == "oom":
                    oom_at[name] = context
            if on_configuration:  # e.g. save what was measured so far: a long run may be stopped
                on_configuration(report)


def _new_report(device, dtype, warmup, repeats, timing, decode_tokens, reference, prefill_chunk,
                interleave) -> BenchReport:
    cuda = device.type == "cuda"
    return BenchReport(
        device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
        dtype=str(dtype).removeprefix("torch."), timing=_Clock(device, timing == "cpu").kind,
        warmup=warmup, repeats=repeats, decode_tokens=decode_tokens,
        memory_kind=_PeakMemory(device).kind, kernels=kernel_backends(device, dtype), reference=reference,
        prefill_chunk=prefill_chunk, interleaved=interleave)


def _cap_memory(device: torch.device, max_memory_bytes: int | None) -> None:
    if max_memory_bytes is None and device.type != "cuda":
        return
    if device.type != "cuda":
        raise ValueError("max_memory_bytes needs a CUDA device (it caps the CUDA allocator)")
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if max_memory_bytes is None else min(1.0, max_memory_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


@dataclass
class _Samples:
    """What the timed repeats of one model in one configuration measured."""

    prefills: list[float] = field(default_factory=list)
    prefill_rates: list[float] = field(default_factory=list)
    decode_rates: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    cache_bytes: int | None = None
    peak_bytes: int = 0
    error: str | None = None


def _measure(group: dict[str, torch.nn.Module], batch: int, context: int, report: BenchReport,
             seed: int) -> dict[str, BenchRun]:
    """One configuration for every model of ``group``: warm-ups, then ``repeats`` rounds in which each
    model runs one timed repeat (the order alternates between rounds, so no model always goes first)."""
    if not group:
        return {}
    device = next(iter(group.values())).device
    clock = _Clock(device, report.timing == "process_cpu_time")
    peak = _PeakMemory(device)
    resident = {name: model_bytes(model) for name, model in group.items()}
    samples = {name: _Samples() for name in group}
    inputs = {}
    for name, model in group.items():
        gen = torch.Generator().manual_seed(seed + context * 7919 + batch)
        inputs[name] = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    for name, model in group.items():
        with _catch_oom(samples[name]):
            for _ in range(report.warmup):
                _prefill_and_decode(model, inputs[name], min(2, report.decode_tokens), clock, report.prefill_chunk)
    _free(device)  # once, before timing: the timed repeats reuse the allocator's cached blocks
    for repeat in range(report.repeats):
        for name in (list(group) if repeat % 2 == 0 else list(reversed(group))):
            sample = samples[name]
            if sample.error is not None:
                continue
            with _catch_oom(sample):
                peak.reset()
                _synchronize(device)
                prefill, steps, cache = _prefill_and_decode(group[name], inputs[name], report.decode_tokens, clock,
                                                            report.prefill_chunk)
                _synchronize(device)
                sample.prefills.append(prefill)
                sample.steps += steps
                sample.prefill_rates.append(batch * context / prefill if prefill > 0 else None)
                sample.decode_rates.append(batch * len(steps) / sum(steps) if sum(steps) > 0 else None)
                sample.cache_bytes = cache_nbytes(cache)
                others = sum(b for other, b in resident.items() if other != name)
                sample.peak_bytes = max(sample.peak_bytes, peak.peak(group[name], sample.cache_bytes, others))
                del cache
    del inputs
    _free(device)
    return {name: _run_of(name, batch, context, sample, report.interleaved) for name, sample in samples.items()}


class _catch_oom:
    """Context manager: an out-of-memory error inside is recorded on the sample; other errors propagate."""

    def __init__(self, sample: _Samples):
        self.sample = sample

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, (RuntimeError, torch.OutOfMemoryError)) or not is_oom(err):
            return False
        self.sample.error = " ".join(str(err).split())[:200]
        return True


def _run_of(name: str, batch: int, context: int, sample: _Samples, keep_repeats: bool) -> BenchRun:
    if sample.error is not None:
        return BenchRun(name, batch, context, "oom", error=sample.error)
    prefill_rates = [r for r in sample.prefill_rates if r is not None]
    decode_rates = [r for r in sample.decode_rates if r is not None]
    return BenchRun(
        name, batch, context, "ok", prefill_seconds=statistics.median(sample.prefills),
        **_median_min_max("prefill_tokens_per_s", prefill_rates),
        **_median_min_max("decode_tokens_per_s", decode_rates),
        decode_latency_ms_p50=1000 * statistics.median(sample.steps),
        decode_latency_ms_p90=1000 * _percentile(sample.steps, 0.9),
        peak_memory_bytes=sample.peak_bytes, cache_bytes=sample.cache_bytes,
        prefill_tokens_per_s_repeats=sample.prefill_rates if keep_repeats else None,
        decode_tokens_per_s_repeats=sample.decode_rates if keep_repeats else None)


def _median_min_max(name: str, values: list[float]) -> dict:
    """``{name: median, name_min: ..., name_max: ...}``, all None without values (a clock too coarse)."""
    if not values:
        return {name: None, f"{name}_min": None, f"{name}_max": None}
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


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
    """Write the report's JSON to ``path``, never over a benchmarked model or a file in its folder."""
    from ..convert.checkpoint_io import check_output_file, write_whole

    path = check_output_file(path, inputs=[m.get("path") for m in report.models.values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_whole(path, json.dumps(report.to_dict(), indent=1))  # a reader never sees half a report
