"""Top-k teacher logits: the sparse KD they define, and the on-disk cache that replays them."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.distill.losses import chunked_kd_loss, kd_loss
from mixerswap.distill.recipe import RecipeError, StageConfig, parse_stages
from mixerswap.distill.teacher_cache import TeacherCache, topk_head, topk_pack
from mixerswap.distill.trainer import run_distill

from .test_pipeline import recipe, setup  # noqa: F401  (module fixture)


def test_topk_kd_is_kl_on_the_renormalized_top_k():
    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.randn(8, 50, dtype=torch.float64, generator=g)
    teacher_logits = torch.randn(2, 5, 50, dtype=torch.float64, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]], dtype=torch.float64)
    for k in (7, 50):
        packed = topk_pack(teacher_logits, k).double()
        got = chunked_kd_loss(student_hidden, lambda h: h @ head, packed, topk_head(50), mask, temperature=2.0,
                              chunk_tokens=3)
        values, idx = teacher_logits.topk(k, dim=-1)
        sparse = torch.full_like(teacher_logits, float("-inf")).scatter(-1, idx, values)
        want = kd_loss(student_hidden @ head, sparse, mask, temperature=2.0)
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, kd_loss(student_hidden @ head, teacher_logits, mask, temperature=2.0))


def test_topk_is_forward_kl_only():
    with pytest.raises(ValueError, match="kd_kind 'forward' only"):
        StageConfig(name="kd", tokens=10, teacher_topk=8, kd_kind="reverse")


def test_cache_replays_teacher_and_refuses_other_settings(setup, tmp_path, monkeypatch):  # noqa: F811
    stages = [{**s, "teacher_topk": 16} for s in parse_stages("kd:1k")]
    cache = tmp_path / "cache"
    run_distill(recipe(setup, tmp_path / "a", stages, teacher_cache=str(cache)), progress=False)
    files = sorted(p.name for p in cache.glob("*.safetensors"))
    assert len(files) == 8 and files[0] == "stage0-step00000000-micro0-rank0.safetensors"

    original = AutoModelForCausalLM.from_pretrained
    calls = {"n": 0}

    def counting(*args, **kwargs):
        model = original(*args, **kwargs)
        if "stories260k" in str(args[0]):
            model.model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    run_distill(recipe(setup, tmp_path / "b", stages, teacher_cache=str(cache)), progress=False)
    assert calls["n"] == 1  # the teacher's held-out perplexity only: every kd batch's logits came from the cache
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different settings.*seq_len"):
        run_distill(recipe(setup, tmp_path / "c", stages, teacher_cache=str(cache), seq_len=16), progress=False)
    with pytest.raises(RecipeError, match="set teacher_topk"):
        recipe(setup, tmp_path / "d", parse_stages("kd:1k"), teacher_cache=str(cache))


def test_cache_files_are_written_atomically(tmp_path):
    cache = TeacherCache(tmp_path, {"x": 1})
    cache.put("k", torch.ones(2, 3, 4))
    assert torch.equal(cache.get("k"), torch.ones(2, 3, 4)) and cache.get("missing") is None
    assert not list(tmp_path.glob(".*tmp"))
