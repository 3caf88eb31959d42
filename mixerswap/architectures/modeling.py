"""``MixerSwapForCausalLM``: the teacher's own HF architecture with some attention modules swapped out.

The student instantiates the teacher's ``*ForCausalLM`` class from ``config.teacher_config`` and
keeps its body (embeddings, decoder layers, final norm) as ``self.model`` and its head as
``self.lm_head``, so state-dict names, MLPs, norms, RoPE and family quirks are exactly the
teacher's. Layers whose plan entry is not ``attention`` get a mixer module in place of their
attention module; mixers take the attention module's call signature, so the teacher's decoder
layer code runs unchanged. One :class:`HybridMixerCache` serves the whole stack.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .cache import HybridMixerCache
from .configuration import MixerSwapConfig
from .families import family_for
from .mixers import Mixer, fp32_parameter_names, mixer_kind
from .mixers.common import PADDING_MASK_KWARG, SEQ_IDX_KWARG, documents
from .plan import ATTENTION, validate_plan

REMOTE_CODE_DIR = Path(__file__).parent / "remote"
AUTO_MAP = {
    "AutoConfig": "configuration_mixerswap.MixerSwapConfig",
    "AutoModelForCausalLM": "modeling_mixerswap.MixerSwapForCausalLM",
}


class MixerSwapPreTrainedModel(PreTrainedModel):
    config_class = MixerSwapConfig
    config: MixerSwapConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()
        # Mixers sit inside the teacher body, whose own ``_init_weights`` knows nothing of them:
        # give them their Mamba-style init. Parameters loaded from a checkpoint are left alone.
        for mixer in self.mixers():
            mixer.init_parameters(std=getattr(self.config, "initializer_range", None) or 0.02)

    def mixers(self) -> list[Mixer]:
        return [m for m in self.modules() if isinstance(m, Mixer)]


class MixerSwapForCausalLM(MixerSwapPreTrainedModel, GenerationMixin):
    """A causal LM whose layers follow ``config.plan``; see the module docstring."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixerSwapConfig):
        teacher_config = config.require_teacher()
        super().__init__(config)
        self.family = family_for(teacher_config.model_type)
        teacher_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(teacher_config)]
        teacher = teacher_cls(teacher_config)
        self.model = teacher.model
        self.lm_head = teacher.lm_head
        self._no_split_modules = list(getattr(teacher, "_no_split_modules", None) or [])

        layers = self.decoder_layers()
        for idx, (kind, settings) in enumerate(validate_plan(config.plan, len(layers))):
            if kind != ATTENTION:
                mixer = mixer_kind(kind).module(settings, teacher_config.hidden_size, idx)
                setattr(layers[idx], self.family.attention_attr, mixer)
        self.post_init()
        # Loading in bf16/fp16 keeps the parameters each mixer declares fp32 (A_log, D, ... of Mamba-2).
        self._keep_in_fp32_modules_strict = {rf"^{re.escape(name)}$" for name in fp32_parameter_names(self)}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As ``PreTrainedModel.from_pretrained``, but a checkpoint that does not hold every weight its
        plan needs, or holds them in other shapes (an edited plan), is an error naming them rather than
        a model with freshly initialized layers."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as err:
            if "mismatch" not in str(err):
                raise
            raise ValueError("the checkpoint's weights do not have the shapes the student's plan gives them"
                             f"{_first_mismatch(cls, args[0] if args else kwargs.get('pretrained_model_name_or_path'))}"
                             "; the plan in config.json was edited or does not belong to these weights: convert the "
                             "teacher again") from None
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = sorted(set(info.get("missing_keys", ())) - tied)
        mismatched = [name for name, *_ in info.get("mismatched_keys", ())]
        if missing or mismatched:
            names = missing or mismatched
            raise ValueError(f"the checkpoint lacks {len(missing)} and mis-shapes {len(mismatched)} weight(s) the "
                             f"student's plan needs ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); the "
                             "plan in config.json was edited or does not belong to these weights: convert again")
        return (model, info) if want_info else model

    def decoder_layers(self) -> torch.nn.ModuleList:
        module = self
        for name in self.family.layers_path.split("."):
            module = getattr(module, name)
        return module

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def layer_mixer(self, layer_idx: int) -> torch.nn.Module:
        """The module in layer ``layer_idx``'s attention slot: the teacher's attention or a mixer."""
        return self.family.mixer_of(self.decoder_layers()[layer_idx])

    def mixer_layers(self) -> dict[int, Mixer]:
        """``{layer index: mixer}`` for every replaced layer."""
        return {i: self.layer_mixer(i) for i, kind in enumerate(self.config.layer_kinds()) if kind != ATTENTION}

    def make_cache(self) -> HybridMixerCache:
        """An empty cache for this plan: KV for attention layers, each mixer's own layer for the others."""
        layers = {i: mixer.new_cache_layer() for i, mixer in self.mixer_layers().items()}
        return HybridMixerCache(self.config.teacher_config, layers)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get("past_key_values")
        if user_cache is not None and not isinstance(user_cache, HybridMixerCache):
            raise TypeError("pass a cache from model.make_cache(); mixerswap students need a HybridMixerCache")
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by mixerswap "
                "students; leave it unset (a HybridMixerCache is used)"
            )
        if user_cache is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.make_cache()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridMixerCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Same contract as the teacher's ``*ForCausalLM.forward``.

        ``attention_mask`` is the usual 2-D padding mask ``[B, past + T]``; recurrent mixers use it
        to keep padding out of their states. Whether it holds any padding is read back from the device
        once per forward (one sync), and mixers get it only when it does. Without a mask,
        ``position_ids`` that restart mark packed documents (the ``transformers`` convention), for
        attention and mixers alike.
        """
        if use_cache is None:
            use_cache = getattr(self.config.teacher_config, "use_cache", True) and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.make_cache()
        if attention_mask is not None and attention_mask.dim() == 2:
            # The one read-back of a decode step: were every layer to test the mask, each would make the
            # host wait for the device (a sync per layer and token on CUDA).
            padded = not bool(attention_mask.all())
            kwargs[PADDING_MASK_KWARG] = attention_mask if padded else None
            if past_key_values is not None and (not padded or ATTENTION not in self.config.layer_kinds()):
                # Nothing for attention layers to mask (no padding, or no attention layer), and with a cache
                # transformers reads no packed documents from position_ids either way: without the mask it
                # skips building one, and the tests (syncs) that come with it.
                attention_mask = None
        elif attention_mask is None and (input_ids is not None or inputs_embeds is not None):
            # Packed documents, found once for every mixer (as transformers does once for its attention).
            batch, seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            continuing = past_key_values is not None and past_key_values.get_seq_length() > 0
            kwargs[SEQ_IDX_KWARG] = documents({}, position_ids, batch, seqlen, continuing=continuing)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = lm_logits(self, hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus the small remote-code modules so ``trust_remote_code=True`` loads it."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)


def _first_mismatch(cls, folder) -> str:
    """`` (layer 0, mamba2: in_proj.weight is [160, 32] in the checkpoint, the plan gives [192, 32])`` for the
    first weight whose stored shape differs from the plan's, or ``""`` when it cannot be told."""
    try:
        from safetensors import safe_open

        config = cls.config_class.from_pretrained(folder)
        with torch.device("meta"):
            shapes = {n: list(t.shape) for n, t in cls(config).state_dict().items()}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    stored = list(f.get_slice(name).get_shape())
                    if name in shapes and shapes[name] != stored:
                        match = re.search(r"layers\.(\d+)\.[^.]+\.(.+)$", name)
                        if not match:
                            return f" ({name} is {stored} in the checkpoint, the plan gives {shapes[name]})"
                        idx = int(match.group(1))
                        kind = config.plan[idx].get("kind", "?") if idx < len(config.plan) else "?"
                        return (f" (layer {idx}, {kind}: {match.group(2)} is {stored} in the checkpoint, the plan's "
                                f"settings give {shapes[name]})")
    except Exception:  # the plain message still holds
        return ""
    return ""


def lm_logits(model, hidden_states: torch.Tensor) -> torch.Tensor:
    """``[..., hidden]`` → ``[..., vocab]`` as the model's forward computes them, for a student or a
    plain HF teacher alike, including the final-logit softcap of Gemma-2/3."""
    config = getattr(model.config, "teacher_config", model.config)
    logits = model.lm_head(hidden_states)
    softcap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap is not None else logits


def write_remote_code(directory) -> None:
    """Copy the ``trust_remote_code`` shims (``configuration_mixerswap.py``, ``modeling_mixerswap.py``)."""
    for src in REMOTE_CODE_DIR.glob("*.py"):
        (Path(directory) / src.name).write_text(src.read_text())
