"""What one decode token costs beyond the arithmetic: time, aten ops and host-device syncs per step.

    OMP_NUM_THREADS=1 python benchmarks/decode_overhead.py              # tiny 16-layer Llama, CPU, ~2 min
    python benchmarks/decode_overhead.py --device cuda --dtype bfloat16 --profile-dir OUT   # the same on a GPU
    python benchmarks/decode_overhead.py --device cuda --dtype bfloat16 --real --workdir DIR --profile-dir OUT
    python benchmarks/decode_overhead.py --kernels torch --no-mask   # the reference kernels; no mask (as bench)

At batch 1 a decode step is bound by launch and Python overhead, not by reading the weights: a model
whose layers dispatch twice the ops of attention decodes slower than its teacher, and one
host-device synchronization per layer (``.item()``, ``bool(tensor)``, ``nonzero``, a copy from host
memory) makes the CPU wait for the GPU once per layer, so the launch overhead no longer overlaps the
GPU's work. This script builds a Llama teacher (by default tiny: 16 layers, hidden 64, 4 heads / 2 KV
heads, head_dim 16, vocab 512; ``--real``: Llama-3.2-1B's shapes through ``convert_memory.py``'s
builder) and its students of every kind with no attention layer left (``mla`` at 25% of the KV
cache; ``swa`` and ``linear`` with their default windows), prefills ``--prompt`` tokens at batch 1
and measures single-token steps with an all-ones attention mask, as ``generate`` passes it:

- ``ms/token``: median over ``--repeats`` of the mean step time of ``--steps`` steps (wall clock on
  CPU, CUDA events on a GPU);
- ``ops``: aten ops dispatched by one step (a ``TorchDispatchMode``; views included), in total, per
  layer, and inside one mixer (layer 1's attention slot); and in total again with each call of a
  ``mixerswap.kernels`` operator counted as one op, as its Triton kernel is one launch on CUDA (on a CPU
  the references run instead, dozens of ops each), so that the CUDA path's count is known without a GPU;
- ``syncs``: ops of one step that synchronize the host with a CUDA device, counted on any device by
  intercepting them (``_local_scalar_dense``, which ``.item()`` and ``bool(t)`` dispatch to,
  ``nonzero``, boolean-mask indexing, tensors built from Python data), with where they come from.

With ``--profile-dir`` each model's step also goes through ``torch.profiler`` and the top ops by CPU
time (and CUDA time on a GPU) are written to ``DIR/decode-profile-<model>.txt``. Writes
``benchmarks/results/decode-overhead.json`` (or ``--json``) with the command, versions and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory import build_checkpoint  # noqa: E402

import mixerswap  # noqa: E402
from mixerswap import kernels  # noqa: E402
import transformers  # noqa: E402
from mixerswap.convert import convert  # noqa: E402
from mixerswap.evals.speed import kernel_ops  # noqa: E402

KINDS = ("mamba2", "gla", "gdn", "swa", "linear", "mla")
SETTINGS = {"mla": {"kv_budget": 0.25}}  # the others: their defaults
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=16, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
# Ops that make the host wait for a CUDA device: reading a value back (.item(), bool(t), int(t), .tolist()),
# output shapes that depend on data, and copies of host data (torch.tensor(list) on a device).
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.nonzero_static", "aten.masked_select",
            "aten.unique", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.equal",
            "aten.is_nonzero", "aten.repeat_interleave.Tensor"}
INDEXING_OPS = {"aten.index", "aten.index_put_", "aten.index_put", "aten._index_put_impl_"}


def sync_op(func, args) -> bool:
    """Whether this aten call synchronizes on CUDA (boolean-mask indexing runs a hidden ``nonzero``)."""
    packet = str(func.overloadpacket)
    if packet in SYNC_OPS or str(func) in SYNC_OPS:
        return True
    if packet == "aten.lift_fresh":  # torch.tensor(data, device=...); a 0-d one is a Python scalar being assigned
        return args[0].dim() > 0
    if packet in INDEXING_OPS and len(args) > 1:
        indices = args[1] if isinstance(args[1], (list, tuple)) else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return False


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, those inside the watched module, and the sync points with their origin."""

    def __init__(self):
        super().__init__()
        self.total = self.inside = 0
        self.watching = self.paused = False
        self.syncs: Counter = Counter()

    def count(self) -> None:
        self.total += 1
        self.inside += self.watching

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.count()
        if sync_op(func, args):
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            self.syncs[f"{func.overloadpacket.__name__} at {where}"] += 1
        return func(*args, **(kwargs or {}))


def build_teacher(work: Path, real: bool, dtype: torch.dtype) -> Path:
    """The random-weight Llama teacher under ``work`` (reused when present)."""
    teacher = work / ("teacher-1b" if real else "teacher-tiny")
    if not (teacher / "config.json").exists():
        if real:
            build_checkpoint(teacher, dtype)
        else:
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(teacher)
    return teacher


def build_student(teacher: Path, kind: str) -> Path:
    """The teacher converted to ``kind`` with no attention layer left (reused when present)."""
    out = teacher.parent / f"{teacher.name}-{kind}-0pct"
    if not (out / "config.json").exists():
        extra = {"mixer_settings": SETTINGS[kind]} if kind in SETTINGS else {}
        convert(teacher, out, to=kind, keep_attention=0.0, progress=False, **extra)
    return out


def load(path: Path, name: str, device: str, dtype: torch.dtype):
    extra = {"attn_implementation": "sdpa"} if name == "teacher" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device).eval()


class Decoder:
    """A model after a prefill at batch 1, stepping one token at a time with an all-ones mask (``generate``'s
    calls) or, with ``mask=False``, none (``mixerswap bench``'s and ``e2e_speed.py``'s calls)."""

    def __init__(self, model, prompt: int, vocab: int, device: str, budget: int, mask: bool = True):
        self.model = model
        ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
        self.mask = torch.ones(1, prompt + budget, dtype=torch.long, device=device) if mask else None
        out = model(ids, attention_mask=self._mask(prompt), use_cache=True)
        self.past, self.length = out.past_key_values, prompt
        self.token = out.logits[:, -1:].argmax(-1)

    def _mask(self, length: int) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:, :length]

    def step(self):
        self.length += 1
        out = self.model(self.token, attention_mask=self._mask(self.length), past_key_values=self.past,
                         use_cache=True)
        self.past = out.past_key_values
        return out


def time_steps(decoder: Decoder, steps: int, repeats: int, device: str) -> list[float]:
    """Mean ms per step of ``steps`` steps, ``repeats`` times (the next token is fixed: its value does not
    change the work, and an argmax would add a sync of the benchmark's own)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(steps):
                decoder.step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            began = time.perf_counter()
            for _ in range(steps):
                decoder.step()
            times.append((time.perf_counter() - began) * 1e3 / steps)
    return times


def count_step(decoder: Decoder, kernels_as_launches: bool = False) -> OpCounter:
    """Ops and syncs of one step, in total and inside layer 1's attention slot. ``kernels_as_launches``: each
    call of a :mod:`mixerswap.kernels` operator counts as one op, as a fused kernel on CUDA would (its syncs
    still count): what the CUDA path dispatches, measured on any device."""
    model = decoder.model
    mixer = model.model.layers[1].self_attn
    counter = OpCounter()

    def watch(flag):
        def hook(*_):
            counter.watching = flag
        return hook

    def as_one(fn):
        def run(*args, **kwargs):
            counter.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.paused = False
                counter.count()
        return run

    handles = [mixer.register_forward_pre_hook(watch(True)), mixer.register_forward_hook(watch(False))]
    entry_points = {op: getattr(kernels, op) for op in kernel_ops()} if kernels_as_launches else {}
    try:
        for op, fn in entry_points.items():
            setattr(kernels, op, as_one(fn))
        with counter:
            decoder.step()
    finally:
        for op, fn in entry_points.items():
            setattr(kernels, op, fn)
        for h in handles:
            h.remove()
    return counter


def profile_step(decoder: Decoder, name: str, folder: Path, device: str) -> Path:
    """``torch.profiler`` tables of one decode step in ``folder`` (the model is warm: timed steps ran before)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # each layer's attention slot (attention or mixer) and MLP as rows of their own: Python time included
    handles, open_ranges = [], []
    for layer in decoder.model.model.layers:
        for label, module in (("[attention slot]", layer.self_attn), ("[mlp]", layer.mlp)):
            def enter(*_, label=label):
                open_ranges.append(torch.autograd.profiler.record_function(label).__enter__())

            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None))]
    try:
        with profile(activities=activities) as prof:
            decoder.step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    averages = prof.key_averages()
    parts = [f"one decode step of {name} (batch 1, all-ones mask, {device}), top ops by self CPU time",
             averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if cuda:
        parts += ["top ops by self CUDA time", averages.table(sort_by="self_device_time_total", row_limit=30)]
    path = folder / f"decode-profile-{name}.txt"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def git_commit() -> str | None:
    """The commit of the code measured (``None`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(mixerswap.__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def measure(name: str, path: Path, args, dtype: torch.dtype) -> dict:
    """Load one model, prefill, warm up, then count one step, time the others and profile one."""
    model = load(path, name, args.device, dtype)
    layers = len(model.model.layers)
    vocab = model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        decoder = Decoder(model, args.prompt, vocab, args.device, 2 + args.steps * args.repeats + 8,
                          mask=not args.no_mask)
        for _ in range(3):  # warm-up: first-call dispatch choices, allocator
            decoder.step()
        counter = count_step(decoder)
        launches = count_step(decoder, kernels_as_launches=True).total
        times = time_steps(decoder, args.steps, args.repeats, args.device)
        profile = profile_step(decoder, name, args.profile_dir, args.device) if args.profile_dir else None
    ms, syncs = statistics.median(times), sum(counter.syncs.values())
    print(f"{name}: {ms:.2f} ms/token, {counter.total} ops, {syncs} syncs"
          + (f" ({', '.join(f'{n} x{c}' for n, c in counter.syncs.items())})" if syncs else ""), flush=True)
    del model, decoder
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"path": str(path), "layers": layers, "ms_per_token": ms, "ms_runs": times, "ops_per_step": counter.total,
            "ops_per_layer": counter.total / layers, "ops_in_one_mixer": counter.inside, "syncs_per_step": syncs,
            "ops_per_step_kernels_as_one": launches,
            "sync_sites": dict(counter.syncs), "profile": str(profile) if profile else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--real", action="store_true", help="Llama-3.2-1B's shapes (random weights) instead of tiny")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here and reuse them (default: temp folder)")
    parser.add_argument("--prompt", type=int, default=64, help="prefill tokens before the measured steps")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (the median is reported)")
    parser.add_argument("--no-mask", action="store_true",
                        help="decode without an attention mask (as mixerswap bench and e2e_speed.py call the models)")
    parser.add_argument("--kernels", default="auto", choices=["auto", *kernels.BACKENDS],
                        help="kernel backend for every operator (torch: the references, no Triton launches)")
    parser.add_argument("--profile-dir", type=Path, help="write a torch.profiler table of one step per model here")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "decode-overhead.json")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)

    results = {}
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
              "versions": {"mixerswap": mixerswap.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "machine": machine(args.device), "device": args.device, "dtype": str(dtype).removeprefix("torch."),
              "model": "llama-3.2-1b-shaped" if args.real else TINY, "prompt": args.prompt, "steps": args.steps,
              "repeats": args.repeats, "mask": not args.no_mask, "kernels": args.kernels, "settings": SETTINGS,
              "models": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-decode-"))
    rows = []
    try:
        teacher = build_teacher(work, args.real, dtype)
        with kernels.use_backend(args.kernels):
            for name in ["teacher", *kinds]:  # converted one at a time: a run stopped early keeps what it measured
                path = teacher if name == "teacher" else build_student(teacher, name)
                results[name] = measure(name, path, args, dtype)
                args.json.write_text(json.dumps(report, indent=1) + "\n")  # kept if a time limit stops the run
                r = results[name]
                rows.append([name, f"{r['ms_per_token']:.2f}", r["ops_per_step"], f"{r['ops_per_layer']:.1f}",
                             r["ops_in_one_mixer"], r["ops_per_step_kernels_as_one"], r["syncs_per_step"]])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    from mixerswap.evals.tables import format_table

    size = "Llama-3.2-1B-shaped" if args.real else "tiny 16-layer Llama"
    print(f"\n{size}, batch 1, {args.prompt}-token prefill, {args.device} {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} thread(s), {'no mask' if args.no_mask else 'all-ones mask'}, kernels "
          f"{args.kernels}; students keep no attention layer")
    print(format_table(["model", "ms/token", "ops/step", "ops/layer", "ops in one mixer", "ops/step, kernels as 1",
                        "syncs/step"], rows))
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
