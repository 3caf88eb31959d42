"""Engines: what owns devices, wrapping, backward, clipping and precision during distillation.

A stage is a module objective (:class:`~.stages.Stage`: ``forward(batch) -> loss``) holding the
student; the engine wraps it so that the whole step, teacher reads included, runs through the
wrapper's forward:

* :class:`DDPEngine` (``distributed: ddp``, the default): ``accelerator.prepare(stage, optimizer,
  scheduler)`` gives DDP when there are several processes (NCCL on GPUs, gloo for ``torchrun`` on
  CPU), autocast for ``mixed_precision``; ``accelerator.backward`` (fp16 loss scaling on CUDA),
  ``accelerator.clip_grad_norm_`` (unscales first), and no gradient all-reduce on the micro-batches
  of an accumulated step but the last (``no_sync``).
* :class:`FSDPEngine` (``distributed: fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``) on the
  process group ``torchrun``/``accelerate launch`` set up. The student is sharded per mixer of a
  replaced layer (``align`` calls mixers directly), per decoder layer (``hidden`` calls blocks
  directly), and a persistent root module holding the student shards the rest (embeddings, final
  norm, ``lm_head``; tied embeddings stay in that one unit) and runs the current stage in its forward.
  FSDP2 gathers a module's parameters only in its own forward, and a module is sharded once, hence
  the one root whose forward dispatches to the stage. The teacher is sharded the same way under its
  own root, :class:`~.teacher.TeacherModel`, whose forward is the only way stages read it;
  ``teacher_offload`` keeps its shards in CPU memory (``CPUOffloadPolicy``, for GPUs). With
  ``mixed_precision: bf16`` the decoder layers and the root gather bf16 parameters and reduce
  gradients in fp32 (``MixedPrecisionPolicy``); mixers gather fp32 so the parameters they declare
  fp32 (Mamba's ``A_log``, ``D``, ``dt`` bias) stay fp32, and autocast runs their matmuls in bf16.

Master weights are fp32 in both engines. fp16 is refused except with ``ddp`` on CUDA.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import nn

from .capture import decoder_layers
from .teacher import TeacherModel

logger = logging.getLogger(__name__)


def check_precision(recipe) -> None:
    """Refuse what cannot work, before anything is loaded."""
    if recipe.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision 'fp16' needs CUDA (loss scaling on GPUs); on CPU use 'bf16' or 'no'")
    if recipe.mixed_precision == "fp16" and recipe.distributed == "fsdp":
        raise ValueError("mixed_precision 'fp16' is not supported with distributed 'fsdp'; use 'bf16'")


def make_engine(recipe, accelerator):
    return (FSDPEngine if recipe.distributed == "fsdp" else DDPEngine)(accelerator, recipe)


class DDPEngine:
    """One process, or data parallel through accelerate (see the module docstring)."""

    name = "ddp"

    def __init__(self, accelerator, recipe):
        self.accelerator = accelerator
        self.recipe = recipe
        self.device = accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def setup_teacher(self, teacher: nn.Module) -> TeacherModel:
        return TeacherModel(teacher.to(self.device))

    def setup_student(self, student: nn.Module) -> nn.Module:
        return student.to(self.device)

    def prepare(self, stage, optimizer, scheduler):
        """``(model, optimizer, scheduler)``: ``model(batch, key=...)`` runs the stage's forward (DDP-wrapped
        with several processes)."""
        return self.accelerator.prepare(stage, optimizer, scheduler)

    def sync(self, model, last_micro: bool):
        """Gradients are all-reduced on the last micro-batch of a step only."""
        return contextlib.nullcontext() if last_micro else self.accelerator.no_sync(model)

    def autocast(self):
        return contextlib.nullcontext()  # accelerate wraps the prepared model's forward in autocast

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, model, params, max_norm: float):
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def step(self, optimizer, scheduler) -> bool:
        """Optimizer and scheduler step; False when fp16 loss scaling skipped it (inf/NaN gradients)."""
        optimizer.step()
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        if not skipped:
            scheduler.step()
        return not skipped

    def end_stage(self) -> None:
        self.accelerator.free_memory()  # drops the stage's wrapper, optimizer and scheduler

    def evaluate(self, objective, batch: dict):
        with torch.no_grad():  # fp32 weights, no autocast: comparable with the perplexity before training
            return objective(batch)


class ShardedRoot(nn.Module):
    """FSDP2 root over the student: its forward runs the current stage objective (``self.stage``)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        object.__setattr__(self, "stage", None)

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        return self.stage(batch, key)


class FSDPEngine:
    """FSDP2 sharding of student and teacher (see the module docstring)."""

    name = "fsdp"

    def __init__(self, accelerator, recipe):
        if not dist.is_initialized():
            raise ValueError("distributed 'fsdp' shards over processes: launch with torchrun or accelerate launch "
                             "(e.g. torchrun --nproc_per_node 2 -m mixerswap distill ...)")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.accelerator = accelerator
        self.recipe = recipe
        self.device = accelerator.device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        bf16 = recipe.mixed_precision == "bf16"
        self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        self.mixer_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        self.root: ShardedRoot | None = None

    def _shard(self, module: nn.Module, **kwargs) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(module, mesh=self.mesh, **kwargs)

    def setup_teacher(self, teacher: nn.Module) -> TeacherModel:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        offload = CPUOffloadPolicy() if self.recipe.teacher_offload else OffloadPolicy()
        if self.recipe.teacher_offload and self.device.type == "cpu":
            logger.info("teacher_offload has no effect on CPU")
            offload = OffloadPolicy()
        wrapped = TeacherModel(teacher if offload.__class__ is CPUOffloadPolicy else teacher.to(self.device))
        for layer in decoder_layers(teacher):
            self._shard(layer, offload_policy=offload)
        self._shard(wrapped, offload_policy=offload)
        if isinstance(offload, CPUOffloadPolicy):  # parameters stay on CPU; buffers (RoPE) go to the device
            for module in teacher.modules():
                for name, buf in module.named_buffers(recurse=False):
                    setattr(module, name, buf.to(self.device))
        return wrapped

    def setup_student(self, student: nn.Module) -> nn.Module:
        student.to(self.device)
        for mixer in student.mixer_layers().values():
            self._shard(mixer, mp_policy=self.mixer_mp)
        for layer in decoder_layers(student):
            self._shard(layer, mp_policy=self.mp)
        self.root = ShardedRoot(student)
        self._shard(self.root, mp_policy=self.mp)
        return student

    def prepare(self, stage, optimizer, scheduler):
        object.__setattr__(self.root, "stage", stage)
        return self.root, optimizer, scheduler

    def sync(self, model, last_micro: bool):
        model.set_requires_gradient_sync(last_micro)  # reduce-scatter on the last micro-batch only
        return contextlib.nullcontext()

    def autocast(self):
        if self.recipe.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, model, params, max_norm: float):
        # DTensor gradients: the norm is reduced over the shards, so every rank clips by the same factor
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, optimizer, scheduler) -> bool:
        optimizer.step()
        scheduler.step()
        return True

    def end_stage(self) -> None:
        object.__setattr__(self.root, "stage", None)

    def evaluate(self, objective, batch: dict):
        object.__setattr__(self.root, "stage", objective)
        try:
            with torch.no_grad(), self.autocast():
                return self.root(batch)
        finally:
            object.__setattr__(self.root, "stage", None)
            self.root.reshard()  # the root keeps its parameters gathered after a forward; state dicts want shards
