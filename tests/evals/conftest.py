"""Shared models for the evaluation tests: a converted stories260k student and a hand-built MQAR solver."""

from __future__ import annotations

import pytest

from mixerswap.convert import convert

from .induction import induction_llama


@pytest.fixture(scope="session")
def stories_student(stories_dir, tmp_path_factory):
    """stories260k with 2 of its 5 layers turned into Mamba-2 (tokenizer copied): scores well above zero."""
    out = tmp_path_factory.mktemp("stories-student") / "student"
    convert(stories_dir, out, attention_layers=[0, 2, 4], progress=False)
    return out


@pytest.fixture(scope="session")
def induction_dirs(tmp_path_factory):
    """``(teacher_dir, all_attention_student_dir)`` of the hand-built induction Llama (vocab 32)."""
    root = tmp_path_factory.mktemp("induction")
    induction_llama().save_pretrained(root / "teacher")
    convert(root / "teacher", root / "student", keep_attention=1.0, progress=False)
    return root / "teacher", root / "student"
