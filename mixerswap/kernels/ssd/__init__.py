"""SSD scan of Mamba-2, one folder per operator (see :mod:`mixerswap.kernels`).

* ``naive.py``: the specification (backend ``torch``): ``ssd_chunk_scan_ref``, ``ssd_step_ref`` and the
  token-by-token ``ssd_recurrent_ref``.
* ``triton.py``: our Triton kernels (backend ``triton``): ``ssd_chunk_scan_triton`` (forward and
  backward, kernels in ``chunk.py``, backward derived in ``README.md``) and ``ssd_step_triton``
  (decoding, in place, no autograd; kernel in ``step.py``). Imported at the first call; chosen by
  ``auto`` on CUDA, usable by name on CPU tensors under ``TRITON_INTERPRET=1``.
* ``mamba_ssm_adapter.py``: mamba-ssm's fused kernel (backend ``mamba_ssm``) where that package is
  installed.
"""

from .. import triton_support
from ..dispatch import register
from . import mamba_ssm_adapter
from .naive import ssd_chunk_scan_ref, ssd_step_ref

register("ssd_chunk_scan", "torch", ssd_chunk_scan_ref)
register("ssd_step", "torch", ssd_step_ref, main_arg="x")  # the first argument is the fp32 state
_DTYPES = triton_support.FLOAT_DTYPES  # fp32, bf16, fp16
triton_support.register_triton("ssd_chunk_scan", "mixerswap.kernels.ssd.triton", "ssd_chunk_scan_triton",
                               dtypes=_DTYPES)
triton_support.register_triton("ssd_step", "mixerswap.kernels.ssd.triton", "ssd_step_triton", dtypes=_DTYPES,
                               grad=False)
if mamba_ssm_adapter.mamba_chunk_scan_combined is not None:
    register("ssd_chunk_scan", "mamba_ssm", mamba_ssm_adapter.ssd_chunk_scan_mamba_ssm,
             supports=mamba_ssm_adapter.supports)
