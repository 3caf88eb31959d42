"""Streaming checkpoint IO: read a teacher shard by shard, write a student shard by shard, atomically.

Memory stays flat whatever the model size: tensors that pass through unchanged are copied as raw
byte ranges from the teacher's safetensors file to the student's, without becoming tensors; only
the attention weights of replaced layers are materialized, one layer at a time. One input shard is
open at a time. Output goes to a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 16 << 20
MAX_HEADER_ROOM = 64 << 10  # room left for a shard's header: a few hundred tensors' entries
WEIGHTS_NAME, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"64KiB"`` or an int → bytes (decimal units, ``iB`` for binary)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise ValueError(f"cannot read size {size!r}; write it like 5GB, 500MB or 64KiB")


class CheckpointError(ValueError):
    """A teacher checkpoint is missing, incomplete or corrupt."""


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


class SafetensorsShard:
    """One ``.safetensors`` file: its header parsed and checked, tensors read or copied on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(f.read(header_len))
            start = 8 + header_len
            header.pop("__metadata__", None)
            self.entries = {}
            for name, info in header.items():
                begin, end = (start + o for o in info["data_offsets"])
                dtype, shape = info["dtype"], tuple(info["shape"])
                if dtype not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {name} has unsupported dtype {dtype}")
                want = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
                if end > size or end - begin != want:
                    raise ValueError(f"tensor {name} has byte range {begin}..{end} that does not fit {shape} "
                                     f"{dtype} in a {size}-byte file (truncated?)")
                self.entries[name] = TensorEntry(name, dtype, shape, begin, end)
            spans = sorted((e.begin, e.end, e.name) for e in self.entries.values() if e.end > e.begin)
            for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
                if begin < end:
                    raise ValueError(f"tensors {first} and {second} overlap in the file")
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
            raise CheckpointError(f"corrupt shard {self.path}: {err}") from None

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(entry.begin)
            data = bytearray(f.read(entry.end - entry.begin))
        if not data:
            return torch.empty(entry.shape, dtype=entry.torch_dtype)
        return torch.frombuffer(data, dtype=entry.torch_dtype).reshape(entry.shape)

    def check_finite(self, name: str, chunk_bytes: int = 1 << 26) -> None:
        """Refuse a floating tensor holding NaN or inf (a damaged checkpoint), reading it in chunks."""
        entry = self.entries[name]
        dtype = entry.torch_dtype
        if not dtype.is_floating_point:
            return
        step = max(dtype.itemsize, chunk_bytes // dtype.itemsize * dtype.itemsize)
        with open(self.path, "rb") as f:
            f.seek(entry.begin)
            for _ in range(entry.begin, entry.end, step):
                data = bytearray(f.read(min(step, entry.end - f.tell())))
                if data and not torch.isfinite(torch.frombuffer(data, dtype=dtype)).all():
                    raise CheckpointError(f"tensor {name} in {self.path} holds NaN or inf values: the checkpoint is "
                                          "damaged; download or export it again")

    def copy_to(self, name: str, out) -> None:
        """Append tensor ``name``'s raw bytes to the open binary file ``out``."""
        entry = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(entry.begin)
            remaining = entry.end - entry.begin
            while remaining:
                chunk = f.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise CheckpointError(f"corrupt shard {self.path}: unexpected end of file in {name}")
                out.write(chunk)
                remaining -= len(chunk)


def refuse_non_finite(model: torch.nn.Module, what: str, chunk: int = 1 << 24) -> None:
    """Refuse a loaded model with a NaN or inf parameter (a damaged checkpoint), naming the tensor;
    checked in chunks, so memory stays flat."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta":
            flat = param.detach().reshape(-1)
            if not all(torch.isfinite(part).all() for part in flat.split(chunk)):
                raise CheckpointError(f"{what}: weight {name} holds NaN or inf values; the checkpoint is damaged: "
                                      "convert, export or download it again")


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; a ``.gguf`` file (or a folder holding only one) as its cached HF folder
    (:mod:`.gguf`); otherwise a Hugging Face hub id, downloaded (config, tokenizer, weights)."""
    from .gguf import find_gguf, gguf_as_hf_folder

    path = Path(name_or_path)
    gguf = find_gguf(path)
    if gguf is not None:
        return gguf_as_hf_folder(gguf)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the folder that holds config.json and the weights, "
                              "or a .gguf file")
    text = str(name_or_path)
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"no such folder: {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(f"{text!r} is not a local folder and could not be fetched from the hub: {err}") from None


def teacher_fingerprint(shards: list[SafetensorsShard], model_type: str) -> str:
    """A short identity of a checkpoint's weights, the same whatever dtype they are stored in.

    Hashes the model type, every tensor's name and shape, and the first 64 values of a few tensors
    (sorted by name: the embedding and the first ones) rounded to bf16, so a re-saved fp32/bf16 copy
    of the same teacher matches and a different model of the same shape does not.
    """
    import hashlib

    digest = hashlib.sha256(model_type.encode())
    entries = sorted((name, shard) for shard in shards for name in shard.entries)
    for name, shard in entries:
        digest.update(f"{name}{shard.entries[name].shape}".encode())
    floats = [(name, shard) for name, shard in entries if shard.entries[name].torch_dtype.is_floating_point]
    sampled = [e for e in floats if "embed" in e[0]][:1] + floats[:4]
    for name, shard in sampled:
        entry = shard.entries[name]
        count = min(64, math.prod(entry.shape))
        with open(shard.path, "rb") as f:
            f.seek(entry.begin)
            data = bytearray(f.read(count * entry.torch_dtype.itemsize))
        if data:
            values = torch.frombuffer(data, dtype=entry.torch_dtype).to(torch.float32).to(torch.bfloat16)
            digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def folder_fingerprint(model_dir: str | os.PathLike) -> str | None:
    """:func:`teacher_fingerprint` of a local safetensors folder, or ``None`` for anything else (hub id)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        return None
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    return teacher_fingerprint([SafetensorsShard(p) for p in list_shards(model_dir)], model_type)


def list_shards(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint in order, checked to exist (safetensors only)."""
    index = model_dir / WEIGHTS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"corrupt index {index}: {err}") from None
        shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing from {model_dir}: {', '.join(missing)}")
        return shards
    single = model_dir / WEIGHTS_NAME
    if single.exists():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError(f"{model_dir} holds PyTorch .bin weights; mixerswap reads safetensors. Re-save "
                              "the teacher once with `model.save_pretrained(dir)` (safetensors is the default)")
    raise CheckpointError(f"no weights in {model_dir}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX}")


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def iter_shards(shards: list[Path]) -> Iterator[SafetensorsShard]:
    """Open shards one at a time (each is parsed and validated when reached)."""
    for path in shards:
        yield SafetensorsShard(path)


class ShardedWriter:
    """Write tensors into ``model-0000i-of-0000N.safetensors`` files of at most ``max_shard_bytes``.

    Each shard is written once, in place, so the output is never on disk twice: tensor bytes go
    straight into the shard file after room left for its header, and when the shard is full its
    header is written into that room. A header that outgrows its room moves the shard's data up
    within the file (later shards get more room); in a shard of up to 64 MiB the data moves down to
    close the gap, in a larger one the rest of the room is left as spaces after the header, as the
    format allows. At most one tensor is in memory at a time.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 5 << 30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.finished: list[tuple[Path, list[str], int]] = []  # (file, names, bytes)
        self._header: dict[str, dict] = {}
        self._file = None
        self._offset = 0
        self._room = _round8(min(max(max_shard_bytes // 1024, 512), MAX_HEADER_ROOM))
        self.total_bytes = 0

    def _ensure_room(self, nbytes: int) -> None:
        if self._file is not None and self._offset and self._offset + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._file is None:
            self._path = self.directory / f".shard-{len(self.finished)}.safetensors"
            self._file = open(self._path, "w+b")
            self._file.seek(8 + self._room)
            self._header, self._offset = {}, 0

    def _record(self, name: str, dtype: str, shape, nbytes: int) -> None:
        if name in self._header or any(name in names for _, names, _ in self.finished):
            raise ValueError(f"tensor {name} written twice")
        self._header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_bytes += nbytes

    def copy(self, shard: SafetensorsShard, name: str, new_name: str | None = None) -> None:
        """Copy a tensor from a teacher shard without materializing it."""
        entry = shard.entries[name]
        nbytes = entry.end - entry.begin
        self._ensure_room(nbytes)
        shard.copy_to(name, self._file)
        self._record(new_name or name, entry.dtype, entry.shape, nbytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous().cpu()
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"cannot store {name} with dtype {tensor.dtype}")
        nbytes = tensor.numel() * tensor.element_size()
        self._ensure_room(nbytes)
        if nbytes:
            self._file.write(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        self._record(name, TORCH_TO_SAFETENSORS[tensor.dtype], tensor.shape, nbytes)

    def _close_shard(self) -> None:
        header = {"__metadata__": {"format": "pt"}, **self._header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        room, need = self._room, _round8(len(blob))
        if need > room:
            self._room = _round8(need * 5 // 4)
        if need > room or self._offset <= 4 * COPY_CHUNK:
            self._move_data(8 + room, need - room)
            room = need
        self._file.seek(0)
        self._file.write(struct.pack("<Q", room) + blob.ljust(room))
        self._file.close()
        self.finished.append((self._path, list(self._header), self._offset))
        self._file = None

    def _move_data(self, start: int, by: int) -> None:
        """Move this shard's data (at ``start``) ``by`` bytes within its file: up from the last chunk
        (the file grows by ``by`` bytes only), or down from the first and cut the file's end."""
        if by == 0:
            return
        end = start + self._offset
        chunks = range(start, end, COPY_CHUNK)
        for begin in reversed(chunks) if by > 0 else chunks:
            self._file.seek(begin)
            chunk = self._file.read(min(COPY_CHUNK, end - begin))
            self._file.seek(begin + by)
            self._file.write(chunk)
        if by < 0:
            self._file.truncate(end + by)

    def written_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor written so far (finished shards and the open one) with its shape."""
        shapes = {}
        for path, names, _ in self.finished:
            shapes.update({n: e.shape for n, e in SafetensorsShard(path).entries.items()})
        shapes.update({n: tuple(info["shape"]) for n, info in self._header.items()})
        return shapes

    def close(self) -> list[Path]:
        """Finish the last shard, give shards their final names, and write the index if sharded."""
        if self._file is not None:
            self._close_shard()
        count = len(self.finished)
        if count == 0:
            raise ValueError("no tensors were written")
        final, weight_map = [], {}
        for i, (path, names, _) in enumerate(self.finished):
            name = WEIGHTS_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            final.append(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return final


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Path:
    """The one check of an output folder, run before any work.

    Refuses an ``out`` that is one of ``inputs`` (teacher, student, data, ...) or a folder containing
    one, whatever ``overwrite`` says (replacing it would delete an input), and an ``out`` that
    exists and is not empty unless ``overwrite``.
    """
    out = Path(out)
    target = out.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "contains"
            raise ValueError(f"output {out} {what} an input of this run ({item}); choose another --out")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    return out


def write_whole(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def check_output_file(path: str | os.PathLike, *, inputs=()) -> Path:
    """The check of an output file (a report, a plot): refuse one that is an input of the run (a model
    folder, a data file) or that would replace a file inside an input folder."""
    path = Path(path)
    target = path.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents or (path.exists() and source in target.parents):
            raise ValueError(f"output {path} would replace an input of this run ({item}) or a file in it; choose "
                             "another path")
    return path


class OutputLockedError(FileExistsError):
    """Another live run is writing the same output."""


_HELD_LOCKS: dict[Path, int] = {}  # lock file -> nesting depth, for this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_is_dead(text: str) -> bool:
    """Whether a lock or temp-folder owner ``"pid host"`` is a process of this host that no longer runs."""
    pid, _, host = text.partition(" ")
    try:
        return host.strip() in ("", socket.gethostname()) and not _pid_alive(int(pid))
    except ValueError:
        return True


@contextmanager
def output_lock(out: str | os.PathLike, *, wait: float = 0.0) -> Iterator[None]:
    """Hold ``.OUT.lock`` beside ``out`` while a run writes it; nested use in one process is allowed.

    A second run on the same output fails with :class:`OutputLockedError` at once, or after waiting up
    to ``wait`` seconds for the first to finish (shared caches); a lock left by a process that died
    (same host, pid gone) is taken over. While holding the lock, what a dead run left is cleaned up
    (:func:`_recover`).
    """
    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    key = lock.resolve() if lock.parent.exists() else lock
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    key = lock.resolve()
    deadline = time.monotonic() + wait
    took_over = announced = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = lock.read_text()
            except FileNotFoundError:  # released between the two calls
                continue
            if not took_over and _owner_is_dead(owner):
                took_over = True
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                raise OutputLockedError(f"output {out} is being written by another run ({owner.strip() or 'unknown'}); "
                                        f"wait for it to finish, or delete {lock} if that run is gone") from None
            if not announced:
                logger.info("waiting for another run (%s) to finish writing %s", owner.strip(), out)
                announced = True
            time.sleep(0.2)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}")
    _HELD_LOCKS[key] = 1
    try:
        _recover(out)
        yield
    finally:
        _HELD_LOCKS.pop(key, None)
        lock.unlink(missing_ok=True)


def _recover(out: Path) -> None:
    """Undo what a dead run left beside ``out``: its temporary folders are removed, and an old output it
    had moved aside but not yet replaced (a crash between the two renames) is put back."""
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, rest = leftover.name[len(out.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not _owner_is_dead(rest.split("-")[0] + " " + socket.gethostname()):
            continue
        if kind == "old" and not out.exists():
            leftover.rename(out)
        else:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on failure it is removed.

    Holds :func:`output_lock` throughout and runs :func:`check_output` first (inputs are never
    replaced; a non-empty ``out`` only with ``overwrite``). Temporary names carry the pid, so a later
    run removes what a killed one left, and puts back an old output caught between the two renames
    of a replacement: after any crash ``out`` is the complete old or the complete new folder.
    """
    out = Path(out)
    with output_lock(out):
        out = check_output(out, overwrite=overwrite, inputs=inputs)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
