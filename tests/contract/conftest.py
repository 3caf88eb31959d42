"""The contract suite's shared pieces: the registered kinds, the teacher families, converted students.

Importing :mod:`.toy_kind` registers ``meanpool`` at collection time, in the main process and in every
xdist worker, so each test parametrized over :data:`KINDS` runs on it as on the built-in kinds.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
import yaml
from transformers import AutoModelForCausalLM

from mixerswap.architectures.mixers import mixer_kind, registered_kinds
from mixerswap.convert import convert

from ..conftest import family_config
from . import toy_kind  # noqa: F401  (registers meanpool)

KINDS = sorted(registered_kinds())
# Tied embeddings + llama3 RoPE; q/k norms and a head_dim that is not hidden / heads; sliding windows,
# softcaps and (1 + w) norms.
FAMILIES = ["llama", "qwen3", "gemma2"]
# Which layers keep attention: none, or the middle one of the pico teachers' three.
PLANS = {"all-replaced": [], "hybrid": [1]}


def tunable(kind: str) -> frozenset[str]:
    return mixer_kind(kind).load_converter().tunable


# Tunable settings, by name, that bound how far a mixer scans at once or sees: set small, so that the
# short prompts of the tests cross several chunks and wrap a window.
SHORT_REACH = {"chunk_size": 5, "window": 4}


def short_reach(kind: str) -> dict:
    return {name: value for name, value in SHORT_REACH.items() if name in tunable(kind)}


def random_ids(*shape, seed=0) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def student_dir(teacher_dir, tmp_path_factory):
    """``student_dir(family, kind, plan)`` → folder of the converted student (``plan`` a key of :data:`PLANS`)."""
    cache = {}

    def get(family: str, kind: str, plan: str):
        key = (family, kind, plan)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{kind}-{plan}") / "student"
            convert(teacher_dir(family), out, to=kind, attention_layers=PLANS[plan],
                    mixer_settings=short_reach(kind), progress=False)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def student(student_dir):
    """``student(family, kind, plan, dtype)`` → the loaded student (eval mode, shared: do not train it)."""
    cache = {}

    def get(family: str, kind: str, plan: str, dtype: torch.dtype = torch.float64):
        key = (family, kind, plan, dtype)
        if key not in cache:
            # sdpa: eager attention in float64 turns fully masked (left-padding) query rows into NaN
            cache[key] = AutoModelForCausalLM.from_pretrained(student_dir(family, kind, plan), dtype=dtype).eval()
        return cache[key]

    return get


@pytest.fixture()
def trainable_student(student_dir):
    """``trainable_student(family, kind, plan)`` → a fresh fp32 copy, free to train."""

    def get(family: str, kind: str, plan: str):
        return AutoModelForCausalLM.from_pretrained(student_dir(family, kind, plan), attn_implementation="eager")

    return get


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    """``teacher(family)`` → the pico teacher, fp32, eager attention (its probabilities are needed)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(teacher_dir(family),
                                                                 attn_implementation="eager").eval()
        return cache[family]

    return get


@pytest.fixture(scope="session")
def deep_teacher_dir(teacher_dir, tmp_path_factory):
    """A pico Llama with a layer for attention and one for each registered kind."""
    layers = len(KINDS) + 1
    if layers <= family_config("llama").num_hidden_layers:
        return teacher_dir("llama")
    config = family_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deep-teacher")
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def plan_file(path, spec: dict):
    path.write_text(yaml.safe_dump(spec))
    return path


def mixed_plan(kinds: list[str]) -> dict:
    """Plan file content: attention in layer 0, then one layer per kind (the last through ``default``)."""
    *named, last = kinds
    return {"layers": [{"layers": 0, "kind": "attention"}]
            + [{"layers": i, "kind": kind, **short_reach(kind)} for i, kind in enumerate(named, start=1)],
            "default": {"kind": last, **short_reach(last)}}


@pytest.fixture(scope="session")
def mixed_student_dir(deep_teacher_dir, tmp_path_factory):
    """``mixed_student_dir(kinds)`` → a student converted with :func:`mixed_plan` (one kind per layer)."""
    cache = {}

    def get(kinds: tuple[str, ...]):
        if kinds not in cache:
            root = tmp_path_factory.mktemp("mixed")
            convert(deep_teacher_dir, root / "student", plan=plan_file(root / "plan.yaml", mixed_plan(list(kinds))),
                    progress=False)
            cache[kinds] = root / "student"
        return cache[kinds]

    return get
