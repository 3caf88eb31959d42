"""Load any causal LM folder (student or teacher) with its tokenizer, and generate text."""

from __future__ import annotations

from pathlib import Path

import torch

from . import architectures  # noqa: F401  (registers the student with the Auto classes)
from .devices import pick_device

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str | Path) -> None:
    """A path-looking argument must be an existing folder or .gguf file (anything else may be a hub id)."""
    if not Path(path).is_dir() and not Path(path).is_file() and str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model folder: {path}")


def pad_token_id(tokenizer) -> int | None:
    """The id ``generate`` pads with: the tokenizer's pad token, else its end of sequence (an id of 0 is an id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_model_and_tokenizer(path: str | Path, *, dtype: str = "auto", device: str | None = None,
                             require_tokenizer: bool = True):
    """``(model, tokenizer)`` from a local folder or hub id, in eval mode on ``device``.

    Without tokenizer files the tokenizer is ``None``, or an error if ``require_tokenizer``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(path)
    from .convert.gguf import hf_model_path

    path = hf_model_path(path)  # a .gguf file: its dequantized HF folder
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model = model.to(pick_device(device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        if require_tokenizer:
            raise FileNotFoundError(f"{path} has no usable tokenizer files ({err})") from None
        tokenizer = None
    return model, tokenizer


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 50, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, chat: bool = False) -> str:
    """Prompt plus continuation, decoded; with ``chat``, ``prompt`` is one user message put through the
    tokenizer's chat template (generation prompt added) and only the reply is returned."""
    torch.manual_seed(seed)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; leave out --chat to continue the prompt")
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            pad_token_id=pad_token_id(tokenizer), **sampling)
    start = inputs["input_ids"].shape[1] if chat else 0
    return tokenizer.decode(output[0, start:], skip_special_tokens=True)
