"""``mixerswap export``: students written as stock architectures load in a process where mixerswap cannot be
imported, with no remote code, and reproduce the student (fp32 logits, greedy cached generation); what no
stock format expresses is refused in one line naming the part; inputs are never overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from mixerswap.cli import main
from mixerswap.convert import convert
from mixerswap.convert.checkpoint_io import OutputExistsError
from mixerswap.export import ExportError, export_student

from ..conftest import family_config

# name: (family, kind, attention layers kept, mixer settings, format)
EXACT = {
    "llama-mla": ("llama", "mla", [], {"exact": True}, "deepseek_v3"),
    "mistral-mla": ("mistral-nowindow", "mla", [], {"exact": True}, "deepseek_v3"),
    "qwen2-mla-hybrid": ("qwen2", "mla", [1], {"exact": True}, "deepseek_v3"),
    "phi3-mla": ("phi3", "mla", [], {"exact": True}, "deepseek_v3"),
    "llama-mla-compressed": ("llama", "mla", [], {"latent_norm": True}, "deepseek_v3"),
    "llama-mamba2-hybrid": ("llama", "mamba2", [1], {"norm_group": "layer", "chunk_size": 5}, "granitemoehybrid"),
    "mistral-mamba2-hybrid": ("mistral-nowindow", "mamba2", [0], {"norm_group": "layer"}, "granitemoehybrid"),
    "qwen2-mamba2-hybrid": ("qwen2", "mamba2", [1], {"norm_group": "layer", "norm": "rms"}, "granitemoehybrid"),
}
PROMPT_TOKENS, NEW_TOKENS = 7, 9


def ids(*shape, seed=0):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teachers(teacher_dir, tmp_path_factory):
    """``teachers(name)``: the shared pico teachers, plus Mistral without its sliding window (as Mistral-7B v0.2+)."""
    cache = {}

    def get(name):
        if name != "mistral-nowindow":
            return teacher_dir(name)
        if name not in cache:
            config = family_config("mistral")
            config.sliding_window = None
            torch.manual_seed(0)
            cache[name] = tmp_path_factory.mktemp("mistral-nowindow")
            T.AutoModelForCausalLM.from_config(config).save_pretrained(cache[name])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def student(teachers, tmp_path_factory):
    """``student(family, kind, kept, settings)`` → a converted student folder."""
    cache = {}

    def get(family, kind, kept, settings):
        key = (family, kind, tuple(kept), tuple(sorted(settings.items())))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp(f"{family}-{kind}") / "student"
            convert(teachers(family), cache[key], to=kind, attention_layers=kept, mixer_settings=settings,
                    progress=False)
        return cache[key]

    return get


STOCK_RUN = textwrap.dedent("""
    import json, sys, torch
    sys.modules["mixerswap"] = None  # any import of mixerswap fails here
    from transformers import AutoModelForCausalLM
    folders, ids_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ids = torch.load(ids_path)
    results = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            prompt = ids[:1, :%d]
            tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=%d, min_new_tokens=%d, use_cache=True)
        results[folder] = {"class": type(model).__module__ + "." + type(model).__name__, "logits": logits,
                           "tokens": tokens}
    torch.save(results, out_path)
""" % (PROMPT_TOKENS, NEW_TOKENS, NEW_TOKENS))


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    """Every :data:`EXACT` case exported, and what a process without mixerswap computes from the exports."""
    root = tmp_path_factory.mktemp("exports")
    results = {}
    for name, (family, kind, kept, settings, _) in EXACT.items():
        results[name] = export_student(student(family, kind, kept, settings), root / name, progress=False)
    torch.save(ids(2, 19), root / "ids.pt")
    folders = [str(r.out) for r in results.values()]
    subprocess.run([sys.executable, "-c", STOCK_RUN, json.dumps(folders), str(root / "ids.pt"), str(root / "out.pt")],
                   check=True, cwd=root, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root)})
    stock = torch.load(root / "out.pt")
    return {name: (results[name], stock[str(results[name].out)]) for name in EXACT}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_round_trip_without_mixerswap(name, exported, student):
    """Stock class, no remote code, logits of the student (fp32 <= 1e-4), the student's greedy cached generation."""
    family, kind, kept, settings, format = EXACT[name]
    result, stock = exported[name]
    assert result.format == format and result.exact and result.max_logit_diff <= 1e-4
    config = json.loads((result.out / "config.json").read_text())
    assert config["model_type"] == format and "auto_map" not in config
    assert not list(result.out.glob("*.py"))
    assert stock["class"].startswith(f"transformers.models.{format}.")
    model = AutoModelForCausalLM.from_pretrained(student(family, kind, kept, settings), dtype=torch.float32).eval()
    x = ids(2, 19)
    with torch.no_grad():
        assert (stock["logits"] - model(x, use_cache=False).logits).abs().max() <= 1e-4
        prompt = x[:1, :PROMPT_TOKENS]
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert torch.equal(stock["tokens"], tokens)
    card = (result.out / "README.md").read_text()
    assert "Exactness: exact" in card and str(student(family, kind, kept, settings)) in card
    assert (result.out / "generation_config.json").exists()


REFUSED = {
    "qwen3-mla": ("qwen3", "mla", [], {"exact": True}, None, "layer 0 (mla) normalizes each query/key head"),
    "qwen3-mamba2": ("qwen3", "mamba2", [1], {"norm_group": "layer"}, None, "normalizes B and C"),
    "gemma2-mla": ("gemma2", "mla", [], {"exact": True}, None, "Gemma-2 decoder layers ((1 + w) norms"),
    "mistral-window-mla": ("mistral", "mla", [], {"exact": True}, None,
                           "attends within a sliding window of 6: DeepSeek-V3 attends to every token"),
    "llama-gdn": ("llama", "gdn", [1], {}, None, "layer 0 is gdn (a gated delta rule with biased output gate"),
    "llama-mamba2-as-dsv3": ("llama", "mamba2", [1], {}, "deepseek_v3", "layer 0 is mamba2: DeepSeek-V3 has only MLA"),
    "llama-mla-compressed-hybrid": ("llama", "mla", [1], {}, None, "layer 1 (attention) has another MLA shape"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals_name_the_part(name, student, tmp_path):
    family, kind, kept, settings, format, message = REFUSED[name]
    with pytest.raises(ExportError, match="^[^\n]*$") as err:
        export_student(student(family, kind, kept, settings), tmp_path / "out", format=format, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_per_head_norm_is_approximate_and_measured(student, tmp_path):
    """The default Mamba-2 student normalizes per head: refused with the fix named; forced, the error is measured."""
    folder = student("llama", "mamba2", [1], {})
    with pytest.raises(ExportError, match="--set norm_group=layer") as err:
        export_student(folder, tmp_path / "out", progress=False)
    assert "--format granitemoehybrid --allow-approximate" in str(err.value)
    result = export_student(folder, tmp_path / "out", allow_approximate=True, progress=False)
    assert not result.exact and result.max_logit_diff is not None and result.issues
    card = (result.out / "README.md").read_text()
    assert "APPROXIMATE" in card and f"{result.max_logit_diff:.3g}" in card


def test_all_mamba_student_needs_an_attention_layer(student, tmp_path):
    """transformers' Granite cannot generate with a cache without attention layers: refused, or written when asked."""
    folder = student("llama", "mamba2", [], {"norm_group": "layer"})
    with pytest.raises(ExportError, match="no layer is attention"):
        export_student(folder, tmp_path / "out", progress=False)
    result = export_student(folder, tmp_path / "out", allow_approximate=True, progress=False)
    assert result.max_logit_diff <= 1e-4


def test_output_safety(student, tmp_path):
    folder = student("llama", "mla", [], {"exact": True})
    with pytest.raises(ValueError, match="is an input"):
        export_student(folder, folder, progress=False)
    with pytest.raises(ValueError, match="contains an input"):
        export_student(folder, folder.parent, overwrite=True, progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        export_student(folder, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").exists()


def test_cli(student, tmp_path):
    folder = student("llama", "mla", [], {"exact": True})
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(folder), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "as deepseek_v3: exact" in result.output
    result = runner.invoke(main, ["export", str(folder), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "exists and is not empty; pass --overwrite" in result.output
    result = runner.invoke(main, ["export", str(folder), "--out", str(tmp_path / "x"), "--format", "nope"])
    assert result.exit_code == 1 and "unknown format 'nope'" in result.output
