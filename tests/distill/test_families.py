"""Every stage runs on every supported teacher family (block replay, softcapped heads, fused qkv, q/k norms)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert
from mixerswap.distill.recipe import StageConfig
from mixerswap.distill.stages import build_stage

from ..conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_on_every_family(family, teacher_dir, tmp_path):
    convert(teacher_dir(family), tmp_path / "s", attention_layers=[1], progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").train()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(family), attn_implementation="eager").eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)  # two packed documents
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": ids}
    for name, mode in [("align", "output"), ("align", "matrix"), ("hidden", "output"), ("kd", "output")]:
        stage = build_stage(StageConfig(name=name, tokens=1, mode=mode, matrix_len=12, ce_weight=0.5), student, teacher)
        params = stage.select_trainable()
        loss, _ = stage.loss(batch)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0, (name, mode)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (name, mode)
        student.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_teacher_blocks_reproduce_their_outputs(family, teacher_dir):
    """What the hidden stage feeds a student block is exactly what the teacher block saw."""
    from mixerswap.distill.capture import block_modules, capture, decoder_layers

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(family), attn_implementation="eager").eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
    layers = list(range(len(decoder_layers(teacher))))
    with torch.no_grad(), capture(block_modules(teacher, layers)) as seen:
        teacher(input_ids=ids, position_ids=position_ids, use_cache=False)
        for i in layers:
            out = decoder_layers(teacher)[i](seen[i].inputs, **seen[i].kwargs)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, seen[i].output, rtol=0, atol=0)
