"""SSD scan of Mamba-2: ``naive.py`` is the specification (backend ``torch``); ``mamba_ssm_adapter.py``
runs mamba-ssm's fused kernel (backend ``mamba_ssm``) where that package is installed."""

from ..dispatch import register
from . import mamba_ssm_adapter
from .naive import ssd_chunk_scan_ref, ssd_step_ref

register("ssd_chunk_scan", "torch", ssd_chunk_scan_ref)
register("ssd_step", "torch", ssd_step_ref, main_arg="x")  # the first argument is the fp32 state
if mamba_ssm_adapter.mamba_chunk_scan_combined is not None:
    register("ssd_chunk_scan", "mamba_ssm", mamba_ssm_adapter.ssd_chunk_scan_mamba_ssm,
             supports=mamba_ssm_adapter.supports)
