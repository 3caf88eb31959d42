"""Every supported family: exact all-attention round trip, faithful weight mapping, working hybrids."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.architectures.families import family_for
from mixerswap.convert import convert

from ..conftest import FAMILIES, build_teacher


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_all_attention_plan_reproduces_teacher_logits(family, teacher_dir, tmp_path):
    convert(teacher_dir(family), tmp_path / "s", keep_attention=1.0, progress=False)
    student, teacher = load(tmp_path / "s"), build_teacher(family)
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_mamba2_mixers_inherit_attention_weights(family, teacher_dir, tmp_path):
    convert(teacher_dir(family), tmp_path / "s", attention_layers=[1], progress=False)
    student, teacher = load(tmp_path / "s"), build_teacher(family)
    fam = family_for(teacher.config.model_type)
    attn = teacher.model.layers[0].self_attn
    mixer = student.model.layers[0].self_attn
    if fam.qkv:
        q, k, v = torch.split(attn.qkv_proj.weight, [mixer.c_dim, mixer.b_dim, mixer.x_dim])
    else:
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    torch.testing.assert_close(mixer.c_proj.weight, q, rtol=0, atol=0)
    torch.testing.assert_close(mixer.b_proj.weight, k, rtol=0, atol=0)
    torch.testing.assert_close(mixer.x_proj.weight, v, rtol=0, atol=0)
    torch.testing.assert_close(mixer.out_proj.weight, attn.o_proj.weight, rtol=0, atol=0)
    if getattr(attn.q_proj if not fam.qkv else attn.qkv_proj, "bias", None) is not None:
        torch.testing.assert_close(mixer.c_proj.bias, attn.q_proj.bias, rtol=0, atol=0)
        torch.testing.assert_close(mixer.x_proj.bias, attn.v_proj.bias, rtol=0, atol=0)
    if fam.q_norm:
        torch.testing.assert_close(mixer.c_norm_weight, attn.q_norm.weight + fam.norm_weight_offset)
        torch.testing.assert_close(mixer.b_norm_weight, attn.k_norm.weight + fam.norm_weight_offset)
    # The attention layer and everything outside the mixers are untouched.
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, tensor in t_state.items():
        if ".layers.0.self_attn." not in name and ".layers.2.self_attn." not in name:
            torch.testing.assert_close(s_state[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_cached_generation_matches_full_forward(family, teacher_dir, tmp_path):
    convert(teacher_dir(family), tmp_path / "s", attention_layers=[1], mixer_settings={"chunk_size": 4},
            progress=False)
    student = load(tmp_path / "s")
    prompt = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = student.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        ids = prompt
        for _ in range(8):
            logits = student(ids, use_cache=False).logits[:, -1]
            logits[:, student.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert out.tolist() == ids.tolist()
