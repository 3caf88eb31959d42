"""MLA students → ``DeepseekV3ForCausalLM`` (all layers dense: ``first_k_dense_replace = num_layers``).

DeepSeek-V3's decoder layer is Llama's (pre-norm RMSNorm, gated MLP) with MLA attention, so the
student's MLP, norms and embeddings are copied byte for byte; attention layers the student kept are
first turned into MLA by the exact GQA→MLA construction (:mod:`mixerswap.convert.mla`). Three
differences between our MLA and DeepSeek's are expressed exactly:

* **RoPE key heads.** DeepSeek shares one RoPE key across all heads; an exactly converted GQA teacher
  needs one per key/value head (``rope_heads = G``). DeepSeek's RoPE key gets ``G`` slots of
  ``rope_dim`` channels (``qk_rope_head_dim = G * rope_dim``, rotate-half layout across the whole key)
  and each query head fills only its group's slot, zeros elsewhere, so ``q_h . k = q_h . k_g(h)``.
  The slots repeat the teacher's frequencies, which DeepSeek's own ``base^(-2i/dim)`` cannot give:
  ``rope_parameters`` is ``longrope`` with per-frequency factors equal in both its short and long
  lists (so it never switches), which yields any frequencies, and ``attention_factor`` = the
  teacher's RoPE scaling. A student with one RoPE key head and the teacher's leading frequencies
  keeps the teacher's ``rope_parameters`` as they are.
* **The latent norm.** DeepSeek always RMS-normalizes the cached latent (``kv_a_layernorm``); a
  student without a latent norm gets one more latent channel, a constant ``C`` (``kv_a_proj``'s bias,
  zero weight) so large that the norm's mean square is ``C^2 / (kv_rank + 1)`` to the last bit of
  fp32 whatever the token (``C >= 2^16`` times a bound on the latent's norm, from the weights and the
  layer's input norm), and norm weights ``sqrt(C^2 / (kv_rank + 1) + eps)`` (0 on the constant), so
  the normalized latent is the latent. It costs one cached value per token and needs
  ``attention_bias``.
* **Query bias** (Qwen2): DeepSeek's ``q_proj`` has none, but with ``q_lora_rank`` its ``q_a_proj``
  has one; the same constant channel makes ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` the biased query
  (``q_lora_rank = H * qk_head_dim + 1``, ``q_b_proj`` the identity).

The score scale (ours: the teacher's ``head_dim ** -0.5``; DeepSeek's: ``qk_head_dim ** -0.5``) is
folded into the query. Not expressible: per-head q/k norms (Qwen3), sliding windows (Mistral with
a window, Gemma), score softcaps, Gemma's norms, MLP biases, RoPE that depends on the length.
"""

from __future__ import annotations

import math

import torch
from transformers import DeepseekV3Config

from ..architectures.plan import ATTENTION
from ..convert.adapters import attention_tensor_names, read_attention
from ..convert.converters import AttentionLayout
from ..convert.mla import CONVERTER as MLA_CONVERTER
from .base import LLAMA_SHAPED, Issue, StockFormat, common_config, like, teacher_rotary

STATIC_ROPE = ("default", "linear", "llama3", "yarn")
CONSTANT_MARGIN = 2.0**16


class DeepseekV3Format(StockFormat):
    """MLA (and exact-MLA attention) layers → DeepSeek-V3; see the module docstring."""

    name = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    summary = "MLA students: DeepSeek-V3 with every layer dense"
    kinds = frozenset({"mla"})

    def __init__(self, config, names):
        super().__init__(config, names)
        self.layers = [settings if kind == "mla" else self._exact_settings(i) if kind == ATTENTION else None
                       for i, (kind, settings) in enumerate(self.plan)]
        first = next((s for s in self.layers if s is not None), None)
        self.mla = first
        if first is None:
            return
        self.q_bias = any(s.qkv_bias for s in self.layers if s is not None)
        self.constant_latent = not first.latent_norm
        self.attention_bias = self.q_bias or self.constant_latent or any(
            s.out_bias or s.qkv_bias for s in self.layers if s is not None)
        self.rope_width = first.rope_heads * first.rope_dim  # DeepSeek's qk_rope_head_dim
        self.qk_head_dim = first.nope_dim + self.rope_width

    def _exact_settings(self, idx: int):
        roles = attention_tensor_names(self.family, idx)
        present = {role for role, name in roles.items() if name in self.names}
        layout = AttentionLayout(self.shape, layer_idx=idx, qkv_bias=bool(present & {"q_bias", "qkv_bias"}),
                                 out_bias="o_bias" in present, qk_norm="q_norm" in present)
        return MLA_CONVERTER.settings(self.teacher, layout, {"exact": True})

    def issues(self) -> list[Issue]:
        found = []
        t, fam = self.teacher, self.family
        if fam.norm_weight_offset or t.model_type not in LLAMA_SHAPED:
            found.append(Issue(f"{fam.name} decoder layers ((1 + w) norms, post-norms): DeepSeek-V3's layers are "
                               "Llama-shaped", approximable=False))
        for i, (kind, _) in enumerate(self.plan):
            if kind not in ("mla", ATTENTION):
                found.append(Issue(f"layer {i} is {kind}: DeepSeek-V3 has only MLA layers", approximable=False))
        if getattr(t, "mlp_bias", False):
            found.append(Issue("the MLPs have biases: DeepSeek-V3's have none", approximable=False))
        rope_type = (getattr(t, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in STATIC_ROPE:
            found.append(Issue(f"the teacher's {rope_type} RoPE changes with the length: DeepSeek-V3's export needs "
                               "static frequencies", approximable=False))
        if self.mla is None:
            return found
        for i, s in enumerate(self.layers):
            if s is None:
                continue
            what = f"layer {i} ({self.plan[i][0]})"
            if s.q_norm or s.k_norm:
                found.append(Issue(f"{what} normalizes each query/key head ({fam.name}'s q_norm/k_norm): DeepSeek-V3 "
                                   "has no per-head q/k norms", approximable=False))
            if s.sliding_window is not None and (s.sliding_layers is None or i in s.sliding_layers):
                found.append(Issue(f"{what} attends within a sliding window of {s.sliding_window}: DeepSeek-V3 "
                                   "attends to every token (approximate: the window is dropped)"))
            if s.softcap is not None:
                found.append(Issue(f"{what} softcaps its scores at {s.softcap}: DeepSeek-V3 does not "
                                   "(approximate: dropped)"))
            shape = (s.n_heads, s.kv_rank, s.rope_dim, s.rope_heads, s.nope_dim, s.v_head_dim, s.rope_freqs,
                     s.latent_norm)
            ref = self.mla
            if shape != (ref.n_heads, ref.kv_rank, ref.rope_dim, ref.rope_heads, ref.nope_dim, ref.v_head_dim,
                         ref.rope_freqs, ref.latent_norm):
                found.append(Issue(f"{what} has another MLA shape than layer {self.layers.index(ref)} (kv_rank "
                                   f"{s.kv_rank} vs {ref.kv_rank}, rope_dim {s.rope_dim} vs {ref.rope_dim}): "
                                   "DeepSeek-V3 gives every layer one shape; convert every layer with the same "
                                   "settings", approximable=False))
            if s.latent_norm and s.norm_eps != t.rms_norm_eps:
                found.append(Issue(f"{what}'s latent norm eps {s.norm_eps} differs from rms_norm_eps "
                                   f"{t.rms_norm_eps}"))
        return found

    def notes(self) -> list[str]:
        s = self.mla
        lines = [f"{self.config.num_hidden_layers} MLA layers, all dense (`first_k_dense_replace = "
                 f"{self.config.num_hidden_layers}`); kept attention layers converted by the exact GQA→MLA "
                 "construction."]
        if s.rope_heads > 1:
            lines.append(f"{s.rope_heads} RoPE key heads laid side by side in one shared RoPE key "
                         f"(`qk_rope_head_dim = {self.rope_width}`), frequencies given as `longrope` factors.")
        if self.constant_latent:
            lines.append("One constant latent channel makes `kv_a_layernorm` an exact identity "
                         f"(`kv_lora_rank = {s.kv_rank} + 1`).")
        if self.q_bias:
            lines.append("The query bias rides on `q_a_proj` with the same constant-channel identity norm.")
        return lines

    def stock_config(self) -> DeepseekV3Config:
        t, s = self.teacher, self.mla
        layers = self.config.num_hidden_layers
        return DeepseekV3Config(
            **common_config(t), intermediate_size=t.intermediate_size, num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_heads, kv_lora_rank=s.kv_rank + int(self.constant_latent),
            q_lora_rank=s.n_heads * self.qk_head_dim + 1 if self.q_bias else None,
            qk_rope_head_dim=self.rope_width, qk_nope_head_dim=s.nope_dim, v_head_dim=s.v_head_dim,
            first_k_dense_replace=layers, n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1,
            n_group=1, topk_group=1, moe_intermediate_size=1, num_mtp_layers=0, rope_interleave=False,
            attention_bias=self.attention_bias, attention_dropout=0.0, rope_parameters=self._rope_parameters(),
        )

    def _rope_parameters(self) -> dict:
        t, s = self.teacher, self.mla
        params = dict(getattr(t, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
        params.pop("partial_rotary_factor", None)
        inv_freq, scaling = teacher_rotary(t)
        half = s.rope_dim // 2
        freqs = s.rope_freqs if s.rope_freqs is not None else list(range(half))
        if s.rope_heads == 1 and freqs == list(range(len(inv_freq))):
            return params  # DeepSeek computes the teacher's frequencies from the same parameters
        target = inv_freq.double()[freqs].repeat(s.rope_heads)  # [rope_width / 2], slot after slot
        base = float(params.get("rope_theta", 10000.0))
        exponent = torch.arange(0, self.rope_width, 2, dtype=torch.int64).float() / self.rope_width
        factors = (1.0 / (target * base ** exponent.double())).tolist()
        return {"rope_type": "longrope", "rope_theta": base, "short_factor": factors, "long_factor": factors,
                "factor": 1.0, "attention_factor": scaling,
                "original_max_position_embeddings": t.max_position_embeddings}

    def route(self, name: str) -> tuple[str, str]:
        parts = name.split(".")
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            return "copy", name
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            return "unknown", name
        idx, module = parts[2], parts[3]
        if module in ("self_attn", "input_layernorm"):
            return "group", f"layer.{idx}"
        if module == "post_attention_layernorm" or (module == "mlp" and parts[4] in ("gate_proj", "up_proj",
                                                                                       "down_proj")):
            return "copy", name
        if module == "mlp" and parts[4] == "gate_up_proj":
            return "group", f"mlp.{idx}"
        return "unknown", name

    def build(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, idx = key.split(".")
        prefix = f"model.layers.{idx}."
        if kind == "mlp":
            fused = tensors[prefix + "mlp.gate_up_proj.weight"]
            gate, up = fused.chunk(2, dim=0)
            return {prefix + "mlp.gate_proj.weight": gate.contiguous(), prefix + "mlp.up_proj.weight": up.contiguous()}
        i = int(idx)
        norm = tensors[prefix + "input_layernorm.weight"]
        attn_prefix = prefix + self.family.attention_attr + "."
        if self.plan[i][0] == ATTENTION:
            attn = read_attention(self.family, self.shape, i, tensors.get)
            state = MLA_CONVERTER.from_attention(attn, self.layers[i], self.teacher)
            reference = attn.q
        else:
            state = {n[len(attn_prefix):]: t for n, t in tensors.items() if n.startswith(attn_prefix)}
            reference = state["q_proj.weight"]
        out = {prefix + "input_layernorm.weight": norm}
        reach = math.sqrt(self.teacher.hidden_size) * norm.double().abs().max().item()
        for name, tensor in self._attention(state, reach, reference.dtype).items():
            out[prefix + "self_attn." + name] = like(tensor, reference)
        return out

    def _slots(self, rope: torch.Tensor, group_of_row: torch.Tensor) -> torch.Tensor:
        """Rows ``[R, rope_dim, ...]`` (rotate-half layout) → ``[R, rope_width, ...]``: row ``r``'s two halves in
        the first and second half of its RoPE key slot ``group_of_row[r]``, zeros elsewhere."""
        s = self.mla
        half, width = s.rope_dim // 2, self.rope_width
        out = rope.new_zeros(rope.shape[0], width, *rope.shape[2:])
        cols = group_of_row[:, None] * half + torch.arange(half)[None]  # [R, half]
        rows = torch.arange(rope.shape[0])[:, None]
        out[rows, cols] = rope[:, :half]
        out[rows, cols + width // 2] = rope[:, half:]
        return out

    def _attention(self, state: dict, reach: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One MLA mixer's state (our names) → DeepSeek-V3 attention tensors, in fp64."""
        s = self.mla
        f64 = torch.float64
        H, nope, hidden = s.n_heads, s.nope_dim, self.teacher.hidden_size
        get = {n: t.to(f64) for n, t in state.items()}
        heads = torch.arange(H)
        head_group = heads // (H // s.rope_heads)
        scale = s.scaling / self.qk_head_dim ** -0.5

        def query(t):  # [H * (nope + rope_dim), ...] → [H * qk_head_dim, ...]
            t = t.reshape(H, nope + s.rope_dim, *t.shape[1:])
            return (torch.cat([t[:, :nope], self._slots(t[:, nope:], head_group)], 1) * scale).flatten(0, 1)

        out = {}
        wq = query(get["q_proj.weight"])
        if self.q_bias:
            bq = query(get["q_proj.bias"]) if "q_proj.bias" in get else wq.new_zeros(wq.shape[0])
            weight, bias, norm = constant_channel(wq, bq, reach, dtype, self.teacher.rms_norm_eps)
            out.update({"q_a_proj.weight": weight, "q_a_proj.bias": bias, "q_a_layernorm.weight": norm,
                        "q_b_proj.weight": torch.eye(wq.shape[0], wq.shape[0] + 1, dtype=f64)})
        else:
            out["q_proj.weight"] = wq

        krope_w = get["k_rope_proj.weight"].view(s.rope_heads, s.rope_dim, hidden)
        krope_b = get.get("k_rope_proj.bias", torch.zeros(s.rope_heads * s.rope_dim, dtype=f64)).view(s.rope_heads,
                                                                                                       s.rope_dim)
        groups = torch.arange(s.rope_heads)
        k_rot_w = self._slots(krope_w, groups).sum(0)  # each slot filled by one group
        k_rot_b = self._slots(krope_b, groups).sum(0)
        down_w = get["kv_down.weight"]
        down_b = get.get("kv_down.bias", torch.zeros(s.kv_rank, dtype=f64))
        if self.constant_latent:
            down_w, down_b, latent_norm = constant_channel(down_w, down_b, reach, dtype, self.teacher.rms_norm_eps)
        else:
            latent_norm = get["latent_norm"]
        out["kv_a_proj_with_mqa.weight"] = torch.cat([down_w, k_rot_w])
        if self.attention_bias:
            out["kv_a_proj_with_mqa.bias"] = torch.cat([down_b, k_rot_b])
        out["kv_a_layernorm.weight"] = latent_norm
        width = down_w.shape[0]
        k_up = get["k_up.weight"].view(H, nope, s.kv_rank) if nope else torch.zeros(H, 0, s.kv_rank, dtype=f64)
        kv_b = torch.cat([k_up, get["v_up.weight"].view(H, s.v_head_dim, s.kv_rank)], 1)
        out["kv_b_proj.weight"] = torch.nn.functional.pad(kv_b, (0, width - s.kv_rank)).reshape(-1, width)
        out["o_proj.weight"] = get["o_proj.weight"]
        if self.attention_bias:
            out["o_proj.bias"] = get.get("o_proj.bias", torch.zeros(hidden, dtype=f64))
        return out


def constant_channel(weight: torch.Tensor, bias: torch.Tensor, reach: float, dtype: torch.dtype, eps: float):
    """``(weight', bias', norm weight)`` such that ``rmsnorm(weight' x + bias') * norm weight = weight x + bias``
    for every ``x`` with ``|x| <= reach``, to fp32 rounding; see the module docstring (the latent norm)."""
    rows = weight.shape[0]
    bound = torch.linalg.matrix_norm(weight, ord=2).item() * reach + bias.norm().item()
    constant = torch.tensor(CONSTANT_MARGIN * max(bound, 1e-3), dtype=torch.float64).to(dtype)
    if not torch.isfinite(constant):
        raise ValueError(f"the constant channel ({CONSTANT_MARGIN * bound:.3g}) overflows {dtype}; export from a "
                         "float32 or bfloat16 student")
    constant = constant.double()
    mean_square = torch.tensor(constant.item() ** 2 / (rows + 1), dtype=torch.float32)
    norm = torch.full((rows + 1,), 1.0 / torch.rsqrt(mean_square + eps).item(), dtype=torch.float64)
    norm[-1] = 0.0
    return (torch.cat([weight, weight.new_zeros(1, weight.shape[1])]), torch.cat([bias, constant.view(1)]), norm)
