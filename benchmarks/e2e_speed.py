"""End-to-end speed and memory: a Llama-3.2-1B-shaped teacher against its students of every kind.

    python benchmarks/e2e_speed.py [--workdir DIR] [--context 2k,...,128k] [--batch 1,64] [--json FILE] [--plot FILE]
    python benchmarks/e2e_speed.py --students mamba2-25%,mamba2-0%   # a subset (default: every student)
    python benchmarks/e2e_speed.py --tiny        # everything scaled down: a few minutes on a laptop CPU

Builds a random-weight checkpoint with Llama-3.2-1B's shapes (no download; ``convert_memory.py``'s
builder), converts it to Mamba-2 with 50%, 25% and 0% of the layers keeping attention and to every
other kind with 25% (``swa`` window 512 with 4 sinks, ``linear`` window 64, ``gla``, ``gdn``) or, for
``mla``, to 25% of the teacher's KV cache (weight-only: random weights have no text to calibrate
on), and runs ``mixerswap.evals.speed.bench`` on the models in one run (each loaded for its turn), bf16 on
CUDA (CUDA events) or float32 on CPU (wall clock, or ``--timing cpu``); one warm-up and
``--repeats`` timed runs per configuration, medians with [min-max]. Long prompts are prefilled in
chunks of ``--prefill-chunk`` tokens so that batch 64 fits; a configuration that does not fit
is recorded as ``oom``. Prints the table, the kernel backends that ran, and the issue's targets:

- batch 64, 32K context: the 25%-attention hybrid decodes >= 3x the teacher's tokens/s, with
  >= 3.5x less cache memory;
- batch 1, 128K context: pure Mamba-2 prefill >= 4x faster than the teacher.

A target whose configurations did not both run is reported as n/a. The targets are meant for an
H100; with ``--tiny`` they are not checked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory import LLAMA_32_1B, build_checkpoint  # noqa: E402

from mixerswap.convert import convert  # noqa: E402
from mixerswap.evals.lengths import format_length, parse_lengths  # noqa: E402
from mixerswap.evals.loading import load_model  # noqa: E402
from mixerswap.evals.plots import plot_bench  # noqa: E402
from mixerswap.evals.speed import bench, save_report  # noqa: E402

STUDENTS = {  # name -> convert() arguments
    "mamba2-50%": dict(to="mamba2", keep_attention=0.5),
    "mamba2-25%": dict(to="mamba2", keep_attention=0.25),
    "mamba2-0%": dict(to="mamba2", keep_attention=0.0),
    "swa-25%": dict(to="swa", keep_attention=0.25, mixer_settings={"window": 512, "sinks": 4}),
    "linear-25%": dict(to="linear", keep_attention=0.25, mixer_settings={"window": 64}),
    "gla-25%": dict(to="gla", keep_attention=0.25),
    "gdn-25%": dict(to="gdn", keep_attention=0.25),
    "mla-kv25%": dict(to="mla", keep_attention=0.0, mixer_settings={"kv_budget": 0.25}),
}
TINY = dict(LLAMA_32_1B, vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
TARGETS = (  # (description, model, batch, context, ratio field, minimum)
    ("25%-attention decode speed at batch 64, 32K", "mamba2-25%", 64, 32768, "decode_speedup", 3.0),
    ("25%-attention cache reduction at batch 64, 32K", "mamba2-25%", 64, 32768, "cache_reduction", 3.5),
    ("pure Mamba-2 prefill speed at batch 1, 128K", "mamba2-0%", 1, 131072, "prefill_speedup", 4.0),
)


def build_teacher(folder: Path, *, tiny: bool, dtype: torch.dtype, max_positions: int) -> None:
    """Random-weight Llama teacher; its position limit is raised to fit the longest prompt plus decoding."""
    if (folder / "config.json").exists():
        return
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype).save_pretrained(folder)
    else:
        build_checkpoint(folder, dtype)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_positions)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def check_targets(ratios: list[dict]) -> list[tuple[str, str, float | None]]:
    by_key = {(r["model"], r["batch"], r["context"]): r for r in ratios}
    results = []
    for text, model, batch, context, field, minimum in TARGETS:
        value = by_key.get((model, batch, context), {}).get(field)
        status = "n/a" if value is None else ("PASS" if value >= minimum else "FAIL")
        results.append((f"{text}: >= {minimum}x", status, value))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="scaled-down models and lengths (CPU, about a minute)")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints here and reuse them (default: temp folder)")
    parser.add_argument("--context", help="default 2k,4k,8k,16k,32k,64k,128k (tiny: 128,256,512,1k)")
    parser.add_argument("--batch", help="default 1,64 (tiny: 1,4)")
    parser.add_argument("--decode-tokens", type=int, help="default 32 (tiny: 8)")
    parser.add_argument("--prefill-chunk", type=int, help="default 8192 (tiny: whole prompt)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (medians reported)")
    parser.add_argument("--timing", choices=["wall", "cpu"], default="wall",
                        help="CPU only: wall clock or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--json", type=Path, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, help="write the PNG plot here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a measured target fails")
    parser.add_argument("--students", help=f"comma-separated subset of {', '.join(STUDENTS)} (default: all)")
    args = parser.parse_args()
    students = args.students.split(",") if args.students else list(STUDENTS)
    unknown = sorted(set(students) - set(STUDENTS))
    if unknown:
        parser.error(f"unknown students {unknown}; known: {', '.join(STUDENTS)}")

    contexts = parse_lengths(args.context or ("128,256,512,1k" if args.tiny else "2k,4k,8k,16k,32k,64k,128k"))
    batches = parse_lengths(args.batch or ("1,4" if args.tiny else "1,64"))
    decode_tokens = args.decode_tokens or (8 if args.tiny else 32)
    prefill_chunk = args.prefill_chunk or (None if args.tiny else 8192)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-e2e-"))
    try:
        teacher = work / ("teacher-tiny" if args.tiny else "teacher")
        # full size: room for the longest default context whatever this run measures, so that later runs with
        # longer contexts can reuse the checkpoints of --workdir
        longest = max(contexts) if args.tiny else max(max(contexts), 131072)
        build_teacher(teacher, tiny=args.tiny, dtype=getattr(torch, dtype), max_positions=longest + max(decode_tokens, 64))
        paths = {"teacher": teacher}
        for name in students:
            out = work / f"{teacher.name}-{name.replace('%', 'pct')}"
            if not (out / "config.json").exists():
                convert(teacher, out, **STUDENTS[name], progress=False)
            paths[name] = out
        loaders = {name: (lambda p=path: load_model(p, dtype=dtype, device=args.device)[0])
                   for name, path in paths.items()}
        partial = (lambda r: save_report(r, args.json)) if args.json else None  # kept if the run is stopped
        report = bench(loaders, contexts=contexts, batches=batches, decode_tokens=decode_tokens, reference="teacher",
                       repeats=args.repeats, timing=args.timing, prefill_chunk=prefill_chunk,
                       echo=lambda line: print(line, flush=True), on_configuration=partial)
        for name, path in paths.items():
            report.models[name]["path"] = str(path)
        print(report.table())
        print(f"prefill chunk {prefill_chunk or 'none'}, kernels requested {report.kernels['requested']}: "
              + ", ".join(f"{op}={b}" for op, b in report.kernels["ops"].items()))
        print("\n".join(report.notes()))
        failed = False
        if args.tiny:
            print("targets: not checked with --tiny (they are for the full-size models on an H100)")
        else:
            for text, status, value in check_targets(report.ratios()):
                print(f"{status:4}  {text}" + (f" (measured {value:.2f}x)" if value is not None else ""))
                failed |= status == "FAIL"
        if args.json:
            print(f"wrote {save_report(report, args.json)}")
        if args.plot:
            print(f"wrote {plot_bench(report.to_dict(), args.plot)}")
        lengths = ", ".join(format_length(c) for c in contexts)
        print(f"models: {', '.join(paths)}; contexts {lengths}; batches {batches}; {decode_tokens} decode tokens")
        return 1 if failed and args.strict else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
