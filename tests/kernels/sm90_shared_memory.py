"""Shared memory that our backward kernels need on an H100, compiled ahead of time without a GPU.

Run as a script (``python sm90_shared_memory.py``) with ``TRITON_INTERPRET`` unset: it compiles each kernel
for ``sm_90`` through triton's own compiler and ptxas, which need no device, and prints one JSON object:
``{case: [[config, bytes], ...]}``, the configurations in the order the launch tries them, up to the first
that fits in :data:`H100_SHARED_MEMORY` (what triton reports as an H100's limit per block). Used by
``test_shared_memory.py``; on a GPU, triton raises ``OutOfResources`` at launch for a configuration over it.
"""

from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

H100_SHARED_MEMORY = 232448
TYPES = {"float32": "fp32", "bfloat16": "bf16"}


def shared_bytes(kernel, constexprs: dict, input_ptrs: set[str], dtype: str, num_warps: int, num_stages: int) -> int:
    """Bytes of shared memory of ``kernel`` compiled for sm_90: pointers named in ``input_ptrs`` hold ``dtype``,
    ``sid``/``seq`` pointers int32, every other pointer fp32; other arguments int32 (``scale`` fp32)."""
    fn = kernel
    while not isinstance(fn, JITFunction):  # autotuner -> jit function
        fn = fn.fn
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            stem = name.removesuffix("_ptr")
            signature[name] = "*i32" if stem in ("sid", "seq") else f"*{TYPES[dtype]}" if stem in input_ptrs else "*fp32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


def until_fit(configs, measure) -> list:
    tried = []
    for config in configs:
        tried.append([list(config), measure(*config)])
        if tried[-1][1] <= H100_SHARED_MEMORY:
            break
    return tried


def main() -> None:
    from mixerswap.kernels.delta_rule import triton as delta
    from mixerswap.kernels.gla import triton as gla

    cases = {}
    for dtype in TYPES:  # the kernels that were seen over the limit, and GLA's widest keys
        precision = "ieee" if dtype == "float32" else "tf32"
        inputs = {"q", "k", "v", "beta", "do", "dq", "dk", "dv", "dbeta", "dg"}
        meta = dict(CHUNK=64, BT=64, BK=128, HAS_SEQ_IDX=True, HAS_DHT=True, PRECISION=precision)
        if dtype == "float32":
            autotuned = [(c.kwargs["BV"], c.num_warps, c.num_stages) for c in delta._V_CONFIGS]
            cases[f"delta_rule _state_bwd_kernel K=V=128 {dtype}"] = until_fit(
                autotuned, lambda bv, w, st: shared_bytes(delta._state_bwd_kernel, {**meta, "BV": bv}, inputs, dtype,
                                                          w, st))
        cases[f"delta_rule _chunk_bwd_kernel K=V=128 {dtype}"] = until_fit(
            delta._chunk_bwd_tiles(128),
            lambda bv, w, st: shared_bytes(delta._chunk_bwd_kernel, {**meta, "BV": bv}, inputs, dtype, w, st))
        for dk in (128, 256):
            block_t = gla._block_t(64, dk)

            def measure(bv, dk=dk, block_t=block_t):
                meta = dict(H=8, K=dk, V=128, BT=block_t, BK=dk, BV=bv, HAS_SEQ=True, PREC=precision,
                            **gla._launch_options(block_t, dk, bv))
                warps = meta.pop("num_warps")
                return shared_bytes(gla._gla_bwd_chunk_kernel, meta, {"q", "k", "v", "g", "do", "dv"}, dtype, warps, 3)

            cases[f"gla _gla_bwd_chunk_kernel K={dk} V=128 {dtype}"] = until_fit(
                [(w,) for w in gla._bwd_widths(dk, 128)], measure)
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
