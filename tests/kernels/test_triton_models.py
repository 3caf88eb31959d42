"""Converted students give the same logits and greedy tokens with our Triton kernels as with the torch
references (on CPU the kernels run in triton's interpreter), and the dispatch log says triton ran.

Tolerance: relative Frobenius error of the logits <= 1e-3 in fp32.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert
from mixerswap.kernels import dispatch

from .conftest import requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in triton's interpreter


@requires_triton
@pytest.mark.parametrize("kind", ["mamba2", "gla", "gdn"])
def test_student_with_triton_kernels_matches_the_reference(kind, teacher_dir, tmp_path, monkeypatch, caplog):
    convert(teacher_dir("llama"), tmp_path / "s", to=kind, keep_attention=0.34, dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).to(DEVICE).eval()
    ids = torch.randint(3, 128, (2, 37), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    prompt = ids[:1, :9]

    def run():
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=5,
                                    pad_token_id=0)
        return logits, tokens

    monkeypatch.setenv(dispatch.ENV_VAR, "torch")  # on CUDA, auto would already pick triton
    dispatch.reset()
    reference, ref_tokens = run()
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.reset()
    with caplog.at_level(logging.DEBUG, logger="mixerswap.kernels"):
        logits, tokens = run()
    assert ((logits - reference).norm() / reference.norm()).item() <= 1e-3
    assert torch.equal(tokens, ref_tokens)
    used = {r.getMessage().split()[1] for r in caplog.records if r.getMessage().endswith("uses backend triton")}
    step_ops = {"mamba2": "ssd_step", "gla": "gla_step", "gdn": "delta_rule_step"}
    assert {"causal_conv1d", "causal_conv1d_step", step_ops[kind]} <= used, used


@requires_triton
def test_linear_student_runs_its_far_part_on_the_triton_gla_kernel(teacher_dir, tmp_path, monkeypatch, caplog):
    convert(teacher_dir("llama"), tmp_path / "s", to="linear", keep_attention=0.34, dtype="float32",
            mixer_settings={"window": 8}, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).to(DEVICE).eval()
    ids = torch.randint(3, 128, (2, 37), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        monkeypatch.setenv(dispatch.ENV_VAR, "torch")
        dispatch.reset()
        reference = model(ids).logits
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        dispatch.reset()
        with caplog.at_level(logging.DEBUG, logger="mixerswap.kernels"):
            logits = model(ids).logits
    assert ((logits - reference).norm() / reference.norm()).item() <= 1e-3
    used = {r.getMessage().split()[1] for r in caplog.records if r.getMessage().endswith("uses backend triton")}
    assert "gla_chunk" in used, used
