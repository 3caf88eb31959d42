"""GGUF teachers: a ``.gguf`` file (or a folder holding one) becomes an ordinary HF folder, once.

``transformers`` reads GGUF checkpoints (``from_pretrained(dir, gguf_file=...)``), dequantizing the
weights, but will not save a model loaded that way as is; the model is rebuilt from its config
without ``quantization_config`` and saved as safetensors with its tokenizer. The folder is cached
under ``$MIXERSWAP_CACHE`` (default ``~/.cache/mixerswap``) keyed by the file's path, size and
modification time, written to a temporary folder and renamed into place, so later commands reuse it;
a second run that asks while the first is writing waits for it and reuses its folder.

The tokenizer ``transformers`` builds from a GGUF file can name the wrong special tokens (SmolLM2's
declares end of sequence ``<|im_end|>``, id 2, and comes back with ``<|im_start|>``, id 1, which
distillation would then put between packed documents and lm-eval would stop generating at), so the
special tokens are set again from the ids the file declares (``tokenizer.ggml.*_token_id``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_CACHE_WAIT_S = 3600.0  # another run dequantizing the same file: wait for it rather than fail
CACHE_FORMAT = 2  # part of the cache key: a folder written by an earlier version of this module is made again
# tokenizer attribute <- GGUF metadata key of its id
SPECIAL_TOKEN_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                      "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``.gguf`` in a folder without safetensors."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not any(path.glob("*.safetensors")):
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            from .checkpoint_io import CheckpointError

            raise CheckpointError(f"{path} holds {len(found)} .gguf files; give the one to use")
        return found[0] if found else None
    return None


def cache_root() -> Path:
    return Path(os.environ.get("MIXERSWAP_CACHE", Path.home() / ".cache" / "mixerswap"))


def cached_folder(gguf: Path) -> Path:
    """Where the HF folder of ``gguf`` is cached: keyed by the file's path, size and mtime (and ``CACHE_FORMAT``)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def gguf_as_hf_folder(gguf: Path) -> Path:
    """The cached HF folder of ``gguf``, made on first use (see the module docstring)."""
    from .checkpoint_io import output_lock

    folder = cached_folder(gguf)
    if (folder / "config.json").exists():
        return folder
    with output_lock(folder, wait=GGUF_CACHE_WAIT_S):  # a second run on the same file waits, then reuses it
        if (folder / "config.json").exists():
            return folder
        _dequantize_into(gguf, folder)
    return folder


def _dequantize_into(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..progress import library_bars
    from .checkpoint_io import atomic_output_dir

    check_gguf_file(gguf)
    logger.info("reading %s (dequantizing; once, cached in %s)", gguf, folder)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # its de-quantizing bar is a plain tqdm that ignores transformers' switch (off under -q and in logs)
    with library_bars(["transformers.modeling_gguf_pytorch_utils"], enabled=hf_logging.is_progress_bar_enabled()):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    set_special_tokens(tokenizer, gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    with atomic_output_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def check_gguf_file(gguf: Path) -> None:
    """Raise a one-line :class:`CheckpointError` when ``gguf`` cannot be read whole: not a GGUF file, cut short
    (an interrupted download), or the ``gguf`` package missing; the readers below would fail deep inside."""
    import struct

    from .checkpoint_io import CheckpointError

    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"reading {gguf} needs the gguf package: pip install 'mixerswap[gguf]'") from None
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(gguf)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, OverflowError, struct.error) as err:
        raise CheckpointError(f"cannot read {gguf}: the file is damaged or cut short ({gguf.stat().st_size:,} "
                              f"bytes; an interrupted download?): download it again (reader: {str(err).rstrip('.')})"
                              ) from None
    if end > gguf.stat().st_size:
        raise CheckpointError(f"{gguf} is cut short: its tensors need {end:,} bytes, the file has "
                              f"{gguf.stat().st_size:,} (an interrupted download?): download it again")


def gguf_metadata(gguf: Path, keys) -> dict:
    """The scalar values of ``keys`` the GGUF file's metadata holds (missing keys are left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    found = {}
    for key in keys:
        field = fields.get(key)
        if field is not None and len(field.data) == 1:
            value = field.parts[field.data[0]]
            found[key] = bytes(value).decode() if field.types[0].name == "STRING" else value[0].item()
    return found


def set_special_tokens(tokenizer, gguf: Path) -> None:
    """Make ``tokenizer``'s bos/eos/unk/pad tokens the ones ``gguf`` declares by id (see the module
    docstring); a byte-level BPE tokenizer (``tokenizer.ggml.model`` ``gpt2``) also gets
    ``clean_up_tokenization_spaces`` off, as ``transformers`` treats it anyway (it warns on every load)."""
    metadata = gguf_metadata(gguf, [*SPECIAL_TOKEN_KEYS.values(), "tokenizer.ggml.model"])
    for name, key in SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(key)
        if token_id is not None and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            if getattr(tokenizer, name) != token:
                logger.info("GGUF tokenizer: %s %r (id %d, as the file declares) instead of %r", name, token,
                            token_id, getattr(tokenizer, name))
                setattr(tokenizer, name, token)
    if metadata.get("tokenizer.ggml.model") == "gpt2":
        tokenizer.clean_up_tokenization_spaces = False


def hf_model_path(name_or_path):
    """``name_or_path`` as ``from_pretrained`` can read it: a GGUF teacher becomes its cached HF folder,
    anything else (folder, hub id) is returned as is."""
    gguf = find_gguf(Path(name_or_path))
    return gguf_as_hf_folder(gguf) if gguf is not None else name_or_path
