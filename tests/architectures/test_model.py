"""The student as an HF model: generation paths, padding, save/load, remote code, dtype."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap import MixerSwapConfig, MixerSwapForCausalLM
from mixerswap.convert import convert

from ..conftest import family_config


@pytest.fixture(scope="module")
def hybrid_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "student"
    convert(teacher_dir("llama"), out, attention_layers=[1], mixer_settings={"chunk_size": 4}, progress=False)
    return out


@pytest.fixture()
def hybrid(hybrid_dir):
    return AutoModelForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float64).eval()


def test_left_padded_batch_equals_rows_alone(hybrid):
    rows = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (11, 4, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = hybrid.generate(ids, attention_mask=mask, **kw)
        logits = hybrid(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = hybrid.generate(r[None], **kw)
            assert batched[i, width:].tolist() == alone[0, len(r) :].tolist()
            alone_logits = hybrid(r[None]).logits[0]
            torch.testing.assert_close(logits[i, width - len(r) :], alone_logits)


def test_sampling_and_multiple_sequences(hybrid):
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = hybrid.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        torch.manual_seed(0)
        top1 = hybrid.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=1,
                               num_return_sequences=3)
        torch.manual_seed(0)
        sampled = hybrid.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=True, temperature=1.5,
                                  num_return_sequences=3)
    assert top1.shape == (6, 10)
    assert top1.tolist() == greedy.repeat_interleave(3, 0).tolist()  # cache was repeated per sequence
    assert sampled.shape == (6, 10)


def test_beam_search_with_cache_equals_without(hybrid):
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False)
    with torch.no_grad():
        cached = hybrid.generate(prompt, **kw)
        uncached = hybrid.generate(prompt, use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()


def test_save_load_round_trip(hybrid_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(hybrid_dir).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert (tmp_path / "modeling_mixerswap.py").exists() and (tmp_path / "configuration_mixerswap.py").exists()


def test_loads_with_trust_remote_code_in_fresh_process(hybrid_dir, tmp_path):
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(hybrid_dir).eval()
    with torch.no_grad():
        want = model(ids).logits
    script = f"""
import json, sys, torch, transformers
assert not any(m.startswith("mixerswap") for m in sys.modules)
model = transformers.AutoModelForCausalLM.from_pretrained({str(hybrid_dir)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor({ids.tolist()})).logits
print(json.dumps({{"class": type(model).__name__, "logits": logits.tolist()}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == "MixerSwapForCausalLM"
    torch.testing.assert_close(torch.tensor(result["logits"]), want, rtol=0, atol=1e-6)


def test_random_init_student_is_sane():
    teacher = family_config("llama")
    plan = [{"kind": "attention"}] + [{"kind": "mamba2", "n_heads": 4, "n_groups": 2, "head_dim": 8,
                                       "d_state": 8}] * 2
    model = MixerSwapForCausalLM(MixerSwapConfig(teacher_config=teacher.to_dict(), plan=plan))
    mixer = model.model.layers[1].self_attn
    assert torch.isfinite(mixer.A_log).all() and (mixer.A_log.exp() >= 1).all()
    assert torch.equal(mixer.D, torch.zeros(4))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied like the teacher
    out = model(torch.randint(0, 128, (1, 9)))
    assert torch.isfinite(out.logits).all()


SSM_FP32 = (".A_log", ".D", ".dt_proj.bias")


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_bf16_student_keeps_ssm_parameters_fp32(teacher_dir, tmp_path, dtype):
    """A bf16 student (bf16 teacher, or --dtype bfloat16): everything bf16 but A_log, D and the dt bias,
    in the checkpoint and after loading in bf16."""
    from safetensors import safe_open

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir("qwen2"), dtype=torch.bfloat16 if dtype == "auto" else None)
    teacher.save_pretrained(tmp_path / "t")
    convert(tmp_path / "t", tmp_path / "s", keep_attention=0.5, dtype=dtype, progress=False)
    with safe_open(tmp_path / "s" / "model.safetensors", "pt") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    fp32 = {name for name in stored if name.endswith(SSM_FP32)}
    assert len(fp32) == 3  # one replaced layer of three
    assert {stored[n] for n in fp32} == {"F32"} and {d for n, d in stored.items() if n not in fp32} == {"BF16"}
    for load_dtype in ("auto", torch.bfloat16):
        student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=load_dtype)
        dtypes = {name: p.dtype for name, p in student.named_parameters()}
        assert {dtypes[n] for n in fp32} == {torch.float32}
        assert {d for n, d in dtypes.items() if n not in fp32} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(student(torch.randint(3, 128, (1, 8))).logits.float()).all()


def test_plan_errors_name_the_layer():
    from mixerswap.architectures import PlanError

    teacher = family_config("llama").to_dict()
    with pytest.raises(PlanError, match="3 layers"):
        MixerSwapConfig(teacher_config=teacher, plan=[{"kind": "attention"}])
    with pytest.raises(PlanError, match="layer 1: unknown mixer kind 'rwkv'"):
        MixerSwapConfig(teacher_config=teacher, plan=[{"kind": "attention"}, {"kind": "rwkv"}, {"kind": "attention"}])
    with pytest.raises(PlanError, match=r"layer 2 \(mamba2\): n_heads"):
        MixerSwapConfig(teacher_config=teacher, plan=[{"kind": "attention"}] * 2 + [{"kind": "mamba2"}])


def test_packed_documents_equal_separate_runs(hybrid):
    """Packed rows (position_ids restarting, no mask), as distillation feeds them: no leak across documents."""
    lengths = [7, 3, 12, 5]
    docs = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = hybrid(ids, position_ids=position_ids, use_cache=False).logits
        start = 0
        for doc in docs:
            alone = hybrid(doc[None], use_cache=False).logits
            torch.testing.assert_close(packed[:, start : start + len(doc)], alone)
            start += len(doc)


def test_a_plain_teacher_folder_is_not_a_student(teacher_dir):
    """Loading a plain HF folder as a student fails at once instead of building some default model."""
    from mixerswap import MixerSwapForCausalLM

    with pytest.raises(ValueError, match="does not describe a mixerswap student"):
        MixerSwapForCausalLM.from_pretrained(teacher_dir("llama"))


@pytest.mark.parametrize("edit", ["layer-becomes-attention", "heads-changed"])
def test_a_plan_that_does_not_fit_the_weights_is_refused(teacher_dir, tmp_path, edit):
    """Editing a student's plan leaves weights missing or mis-shaped: loading names them instead of
    initializing them at random."""
    import json

    convert(teacher_dir("llama"), tmp_path / "s", keep_attention=0.34, progress=False)
    config_path = tmp_path / "s" / "config.json"
    config = json.loads(config_path.read_text())
    if edit == "layer-becomes-attention":
        config["plan"][0] = {"kind": "attention"}
        message = "lacks 4 and mis-shapes 0 weight"
    else:
        config["plan"][0].update(n_heads=2, n_groups=2)
        message = "do not have the shapes the student.s plan gives them"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("shim, blocked", [("configuration_mixerswap.py", "mixerswap.architectures.configuration"),
                                           ("modeling_mixerswap.py", "mixerswap.architectures.modeling")],
                         ids=["config", "model"])
def test_remote_code_without_the_package_says_how_to_install_it_from_source(shim, blocked, monkeypatch):
    """The package is not on PyPI: the shims a checkpoint carries say to install it from a clone, not `pip install
    mixerswap`."""
    import runpy
    from pathlib import Path

    import mixerswap.architectures as architectures

    monkeypatch.setitem(sys.modules, blocked, None)  # what `import` meets on a machine without mixerswap
    with pytest.raises(ImportError) as err:
        runpy.run_path(str(Path(architectures.__file__).parent / "remote" / shim))
    message = str(err.value)
    assert "pip install -e <mixerswap source folder> (a clone of its repository)" in message
    assert "pip install mixerswap" not in message
