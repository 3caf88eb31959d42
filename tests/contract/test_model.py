"""Every kind inside a converted student: generation with the cache, left padding, packed documents,
save/load, ``trust_remote_code`` loading and random initialization.

Students are the pico teachers of several families converted with ``--to KIND``, all layers replaced
or the middle one kept as attention; logits are compared in float64, where every path is exact to
rounding.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap import MixerSwapConfig, MixerSwapForCausalLM
from mixerswap.architectures.mixers import mixer_kind

from .conftest import FAMILIES, KINDS, PLANS, random_ids

GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)

every_plan = pytest.mark.parametrize("plan", PLANS)
every_kind = pytest.mark.parametrize("kind", KINDS)
every_family = pytest.mark.parametrize("family", FAMILIES)


@every_plan
@every_kind
@every_family
def test_cached_generation_equals_repeated_full_forwards(family, kind, plan, student):
    model = student(family, kind, plan)
    prompt = random_ids(1, 9, seed=1)
    with torch.no_grad():
        generated = model.generate(prompt, **GREEDY)
        ids = prompt
        for _ in range(GREEDY["max_new_tokens"]):
            logits = model(ids, use_cache=False).logits[:, -1]
            logits[:, model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert generated.tolist() == ids.tolist()


@every_kind
@every_family
def test_beam_search_and_sampled_sequences_follow_the_cache(family, kind, student):
    """Beam search reorders each layer's cache and ``num_return_sequences`` repeats it: same as no cache."""
    model = student(family, kind, "hybrid")
    prompt = random_ids(2, 6, seed=3)
    with torch.no_grad():
        beams = [model.generate(prompt, num_beams=3, use_cache=use, **GREEDY) for use in (True, False)]
        greedy = model.generate(prompt, **GREEDY)
        torch.manual_seed(0)
        top1 = model.generate(prompt, **{**GREEDY, "do_sample": True}, top_k=1, num_return_sequences=3)
    assert beams[0].tolist() == beams[1].tolist()
    assert top1.tolist() == greedy.repeat_interleave(3, 0).tolist()


@every_kind
def test_student_without_converted_weights_is_initialized(kind, student):
    """A student built from a plan alone gets each mixer's ``init_parameters`` and runs."""
    config = MixerSwapConfig.from_dict(student("llama", kind, "hybrid").config.to_dict())
    torch.manual_seed(0)
    model = MixerSwapForCausalLM(config).eval()
    for i, mixer in model.mixer_layers().items():
        assert isinstance(mixer, mixer_kind(kind).module)
        for name, p in mixer.named_parameters():
            assert torch.isfinite(p).all(), f"layer {i}: {name}"
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 9)).logits).all()


@every_kind
@every_family
def test_left_padded_rows_equal_rows_alone(family, kind, student):
    """Hybrid students: padding must stay out of the mixers' states and out of the attention layer's keys."""
    model = student(family, kind, "hybrid")
    rows = [random_ids(n, seed=n) for n in (11, 4, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    kw = dict(GREEDY, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        prompt_logits = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model.generate(r[None], **kw)
            assert batched.sequences[i, width:].tolist() == alone.sequences[0, len(r) :].tolist()
            for step_batched, step_alone in zip(batched.logits, alone.logits, strict=True):
                torch.testing.assert_close(step_batched[i], step_alone[0])
            torch.testing.assert_close(prompt_logits[i, width - len(r) :], model(r[None]).logits[0])


@every_kind
@every_family
def test_packed_documents_equal_separate_runs(family, kind, student):
    """One row, position_ids restarting at each document, no mask, no cache: as distillation feeds them."""
    model = student(family, kind, "hybrid")
    docs = [random_ids(n, seed=n) for n in (7, 1, 12, 5)]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=position_ids, use_cache=False).logits[0]
        for doc, part in zip(docs, packed.split([len(d) for d in docs]), strict=True):
            torch.testing.assert_close(part, model(doc[None], use_cache=False).logits[0])


@every_kind
@every_family
def test_save_load_round_trip(family, kind, student, tmp_path):
    model = student(family, kind, "hybrid", torch.float32)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 17)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.config.plan == model.config.plan
    assert (tmp_path / "modeling_mixerswap.py").is_file() and (tmp_path / "configuration_mixerswap.py").is_file()


def built_in(kind: str) -> bool:
    return mixer_kind(kind).module.__module__.startswith("mixerswap.")


REMOTE_SCRIPT = """
import json, sys, torch, transformers
assert not any(m.startswith("mixerswap") for m in sys.modules)
model = transformers.AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor({ids}), attention_mask=torch.tensor({mask})).logits
print(json.dumps({{"class": type(model).__name__, "logits": logits.tolist()}}))
"""


def remote_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = random_ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def test_built_in_kinds_load_with_trust_remote_code_in_a_fresh_process(mixed_student_dir, tmp_path):
    """One student holding every built-in kind, loaded by a process that has only imported transformers."""
    path = mixed_student_dir(tuple(kind for kind in KINDS if built_in(kind)))
    ids, mask = remote_inputs()
    script = REMOTE_SCRIPT.format(path=str(path), ids=ids.tolist(), mask=mask.tolist())
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == "MixerSwapForCausalLM"
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path).eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", [k for k in KINDS if not built_in(k)])
def test_registered_kind_loads_with_trust_remote_code(kind, student_dir):
    """A kind registered by its user (like the test's ``meanpool``) loads in the process that registered it."""
    path = student_dir("llama", kind, "hybrid")
    ids, mask = remote_inputs()
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(remote).__name__ == "MixerSwapForCausalLM"
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path).eval()(ids, attention_mask=mask).logits
        torch.testing.assert_close(remote(ids, attention_mask=mask).logits, want, rtol=0, atol=0)
