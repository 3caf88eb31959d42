"""Peak memory and wall time of `mixerswap convert` on a ~1B-parameter Llama checkpoint in 4 shards.

    python benchmarks/convert_memory.py [--workdir DIR] [--dtype bfloat16] [--keep-attention 0.25]

Builds a random-weight checkpoint with Llama-3.2-1B's shapes (no download) tensor by tensor, then
runs the conversion in a child process and reads that process's peak resident set size. The
streaming design predicts a peak far below the checkpoint size; the script fails (exit 1) if the
peak is not below half of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)


# Runs `mixerswap convert` in a fresh process and reports that process's own high-water mark
# (VmHWM belongs to the new address space, so pages of the parent it was forked from don't count).
CHILD = """
import json, sys
from mixerswap.cli import main
try:
    main(json.loads(sys.argv[1]), standalone_mode=False)
finally:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"peak_rss_bytes": int(hwm.split()[1]) * 1024}))
"""


def build_checkpoint(folder: Path, dtype: torch.dtype, shards: int = 4) -> int:
    """Write a random-weight Llama-3.2-1B-shaped checkpoint in ``shards`` files; returns its bytes."""
    config = LlamaConfig(**LLAMA_32_1B)
    config.dtype = dtype
    with torch.device("meta"):
        names = {n: t.shape for n, t in LlamaForCausalLM(config).state_dict().items() if n != "lm_head.weight"}
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(torch.Size(s).numel() for s in names.values()) * itemsize
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    groups, current, size, limit = [], [], 0, total / shards
    for name, shape in names.items():
        current.append((name, shape))
        size += torch.Size(shape).numel() * itemsize
        if size >= limit * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.randn(shape, generator=gen) * 0.02 if "norm" not in name else torch.ones(shape)
            tensors[name] = t.to(dtype)
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--keep-attention", default="0.25")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-convert-bench-"))
    teacher, student = work / "teacher", work / "student"
    try:
        t0 = time.perf_counter()
        size = build_checkpoint(teacher, getattr(torch, args.dtype))
        build_s = time.perf_counter() - t0
        params = size // torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        cli_args = ["convert", str(teacher), "--to", "mamba2", "--keep-attention", args.keep_attention,
                    "--out", str(student), "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cli_args)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        out_bytes = sum(p.stat().st_size for p in student.glob("*.safetensors"))
        rows = [
            ("teacher parameters", f"{params / 1e9:.3f} B"),
            ("teacher checkpoint", f"{size / 2**30:.2f} GiB in {len(list(teacher.glob('*.safetensors')))} shards "
                                   f"({args.dtype}); built in {build_s:.0f} s"),
            ("student checkpoint", f"{out_bytes / 2**30:.2f} GiB in {len(list(student.glob('*.safetensors')))} shards"),
            ("convert wall time", f"{wall:.1f} s (whole process, incl. Python start-up and imports)"),
            ("convert peak RSS", f"{peak / 2**30:.2f} GiB"),
            ("peak RSS / checkpoint", f"{peak / size:.2f} (must be < 0.50)"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        ok = peak < size / 2
        print("PASS" if ok else "FAIL: peak RSS is not below half the checkpoint size")
        return 0 if ok else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
