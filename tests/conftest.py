"""Pico teachers (hidden 32, 3 layers, vocab 128), one per supported family, saved once per session."""

from __future__ import annotations

import math
import os
from pathlib import Path

if not os.path.exists("/dev/nvidiactl"):
    # Our Triton kernels run on CPU tensors through triton's interpreter. Triton reads the switch when a
    # jit function is defined — its own standard library (tl.sum, ...) included, at the first import of
    # triton, which importing transformers may already do — so it is set before anything is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import transformers as T

import mixerswap  # noqa: F401  (registers the Auto classes)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: oversubscribed cores slow torch down several-fold
# ../shared/data beside the checkout; MIXERSWAP_SHARED_DATA points elsewhere (a copy on another machine)
SHARED_DATA = Path(os.environ.get("MIXERSWAP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package), to call its ``main``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def family_config(family: str) -> T.PreTrainedConfig:
    """A pico config exercising each family's quirks (rope scaling, biases, q/k norms, head_dim, windows)."""
    builders = {
        "llama": lambda: T.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=6),
        "qwen2": lambda: T.Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=16),
        "phi3": lambda: T.Phi3Config(**COMMON, partial_rotary_factor=0.5),
        "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16, sliding_window=6),
        "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=6),
    }
    return builders[family]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]


def build_teacher(family: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(family_config(family), attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma): make them informative
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """``teacher_dir(family)`` → folder of a saved pico teacher (sharded, to exercise the index)."""
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"teacher-{family}")
            build_teacher(family).save_pretrained(path, max_shard_size="40KB")
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="session")
def stories_dir():
    path = SHARED_DATA / "teachers" / "stories260k"
    if not (path / "model.safetensors").exists():
        pytest.skip("shared stories260k teacher not available")
    return path


@torch.no_grad()
def teacher_stories(model_dir, count: int, calibration: int = 8, seed: int = 0):
    """``(tokenizer, teacher, calibration text, held-out rows)``: the teacher samples ``count`` stories
    (seeded, 160 new tokens); the first ``calibration`` are calibration text, the rest held out as ids."""
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    teacher = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    start = torch.full((count, 1), tokenizer.bos_token_id)
    out = teacher.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=160,
                           pad_token_id=tokenizer.eos_token_id)
    stories = [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]
    held_out = [torch.tensor(tokenizer(s)["input_ids"]) for s in stories[calibration:]]
    return tokenizer, teacher, "\n\n".join(stories[:calibration]), held_out


@torch.no_grad()
def held_out_perplexity(model, rows) -> float:
    """Next-token perplexity over ``rows`` (token id tensors), each scored on its own."""
    nll = sum(torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="sum")
              for ids in rows)
    return math.exp(nll.item() / sum(len(ids) - 1 for ids in rows))
