"""Mamba-2 (+ attention) students → ``GraniteMoeHybridForCausalLM`` (Granite-4.0's class, no experts).

Why this class: of the Mamba-2 hybrids in transformers, it is the one whose other parts are Llama's.
Its layers are pre-norm RMSNorm + (Mamba-2 or attention) + gated MLP (``shared_mlp`` alone when
``num_local_experts = 0``), its attention is Llama's with optional RoPE (any static ``rope_parameters``)
and one bias switch, and its multipliers (embedding, residual, logits, attention scale) can be set to
the plain values. ``bamba`` hard-codes half-rotary RoPE; ``nemotron_h``'s MLP is not gated and its
attention has no RoPE; ``falcon_h1`` runs attention and Mamba side by side in every layer;
``zamba2`` has no MLP in its Mamba layers.

Our Mamba-2 is standard Mamba-2 once its grouped-query sharing is unrolled: ``x`` and ``B`` keep the
teacher's ``G`` key/value heads, shared by ``H / G`` heads; Granite's ``x`` has ``H`` heads and
``B``/``C`` ``n_groups`` groups, so ``x`` and ``B`` rows (projection, conv taps and biases) are repeated
per head and ``mamba_n_groups = H``. ``in_proj`` = ``[z | x | B | C | dt]``, ``dt_proj.bias`` →
``dt_bias``; the gate's bias (ours always has one) needs ``mamba_proj_bias``. A student with
``norm: rms`` (no gate) gets ``silu(z) = 1``: zero gate weights and the bias whose SiLU is one.

Granite's gated norm spans the whole layer (``H * P`` channels); ours spans each head unless the
student was converted with ``norm_group: layer`` (``--set norm_group=layer``). A per-head student is
written only approximately (the per-head norms become one). Not expressible: B/C norms (Qwen3),
q/k norms, partial rotary (Phi-3), the conv without SiLU, no output norm, Gemma's layers.
"""

from __future__ import annotations

import torch
from transformers import GraniteMoeHybridConfig

from ..architectures.mixers.gdn import SILU_INVERSE_OF_ONE
from ..architectures.plan import ATTENTION
from ..convert.adapters import attention_tensor_names, read_attention
from ..convert.mla import rotary_width
from .base import LLAMA_SHAPED, Issue, StockFormat, common_config, like, sliding_window_layers



class GraniteMoeHybridFormat(StockFormat):
    """Mamba-2 and attention layers → Granite-4.0's hybrid class; see the module docstring."""

    name = "granitemoehybrid"
    architecture = "GraniteMoeHybridForCausalLM"
    summary = "Mamba-2 + attention students: Granite-4.0's hybrid, dense MLPs"
    kinds = frozenset({"mamba2"})

    def __init__(self, config, names):
        super().__init__(config, names)
        self.mamba = next((s for kind, s in self.plan if kind == "mamba2"), None)
        roles = [attention_tensor_names(self.family, i) for i in range(len(self.plan))]
        self.attn_bias = any(names & {r.get("q_bias"), r.get("qkv_bias"), r.get("o_bias")} for r in roles)

    def issues(self) -> list[Issue]:
        found = []
        t, fam = self.teacher, self.family
        if fam.norm_weight_offset or t.model_type not in LLAMA_SHAPED:
            found.append(Issue(f"{fam.name} decoder layers ((1 + w) norms, post-norms): Granite's layers are "
                               "Llama-shaped", approximable=False))
        if getattr(t, "mlp_bias", False):
            found.append(Issue("the MLPs have biases: Granite's have none", approximable=False))
        if t.hidden_act != "silu":
            found.append(Issue(f"the MLP activation is {t.hidden_act}: Granite uses one activation for its MLPs "
                               "and Mamba convs, which must be SiLU", approximable=False))
        attention = [i for i, (kind, _) in enumerate(self.plan) if kind == ATTENTION]
        if not attention:
            found.append(Issue("no layer is attention: transformers' Granite cannot generate with a cache then "
                               "(DynamicCache.get_seq_length needs an attention layer; use_cache=False works): keep "
                               "one attention layer"))
        for i, (kind, s) in enumerate(self.plan):
            if kind not in ("mamba2", ATTENTION):
                found.append(Issue(f"layer {i} is {kind}: Granite has Mamba-2 and attention layers only",
                                   approximable=False))
            elif kind == "mamba2":
                found.extend(self._mamba_issues(i, s))
        if attention:
            i = attention[0]
            if fam.q_norm:
                found.append(Issue(f"layer {i} (attention) normalizes each query/key head ({fam.name}'s q_norm/"
                                   "k_norm): Granite's attention has none", approximable=False))
            if rotary_width(t, self.shape.head_dim) != self.shape.head_dim:
                found.append(Issue(f"layer {i} (attention) rotates part of each head (partial rotary): Granite "
                                   "rotates whole heads", approximable=False))
            sliding = sorted(set(sliding_window_layers(t)) & set(attention))
            if sliding:
                found.append(Issue(f"layer {sliding[0]} (attention) attends within a sliding window of "
                                   f"{t.sliding_window}: Granite attends to every token (approximate: dropped)"))
            if getattr(t, "attn_logit_softcapping", None):
                found.append(Issue("attention scores are softcapped: Granite does not", approximable=False))
        return found

    def _mamba_issues(self, i: int, s) -> list[Issue]:
        found, what = [], f"layer {i} (mamba2)"
        if s.norm_group == "head" and s.norm != "none" and s.n_heads > 1:
            found.append(Issue(f"{what} normalizes each head's output: Granite's gated norm spans the whole layer "
                               "(convert with --set norm_group=layer for an exact export; approximate: one norm)"))
        if s.norm == "none":
            found.append(Issue(f"{what} has no output norm: Granite always has one", approximable=False))
        if s.bc_norm:
            found.append(Issue(f"{what} normalizes B and C (from {self.family.name}'s q/k norms): Granite does not",
                               approximable=False))
        if s.conv_activation != "silu":
            found.append(Issue(f"{what} has no SiLU after its conv: Granite's conv activation is SiLU",
                               approximable=False))
        ref = self.mamba
        if (s.n_heads, s.n_groups, s.head_dim, s.d_state, s.conv_kernel) != (ref.n_heads, ref.n_groups, ref.head_dim,
                                                                             ref.d_state, ref.conv_kernel):
            found.append(Issue(f"{what} has another Mamba-2 shape than the first: Granite gives every Mamba layer one",
                               approximable=False))
        if (s.n_heads * s.head_dim) % self.teacher.hidden_size:
            found.append(Issue(f"{what} has H * P = {s.n_heads * s.head_dim} channels, not a multiple of the hidden "
                               f"size {self.teacher.hidden_size} (Granite's mamba_expand is an integer)",
                               approximable=False))
        if s.norm_eps != self.teacher.rms_norm_eps:
            found.append(Issue(f"{what}'s norm eps {s.norm_eps} is not rms_norm_eps {self.teacher.rms_norm_eps}"))
        return found

    def notes(self) -> list[str]:
        lines = ["Dense MLPs (`num_local_experts = 0`, `shared_mlp`), multipliers 1, attention scale "
                 f"{self.shape.head_dim}^-0.5, the teacher's RoPE."]
        if self.mamba is not None:
            s = self.mamba
            lines.append(f"Mamba-2 layers: {s.n_heads} heads, x and B repeated from {s.n_groups} key/value groups "
                         f"(`mamba_n_groups = {s.n_heads}`).")
        return lines

    def stock_config(self) -> GraniteMoeHybridConfig:
        t, s = self.teacher, self.mamba
        kinds = [kind for kind, _ in self.plan]
        extra = {}
        if self.shape.head_dim != t.hidden_size // t.num_attention_heads:
            extra["head_dim"] = self.shape.head_dim
        if s is not None:
            extra.update(mamba_n_heads=s.n_heads, mamba_n_groups=s.n_heads, mamba_d_state=s.d_state,
                         mamba_d_head=s.head_dim, mamba_expand=s.n_heads * s.head_dim // t.hidden_size,
                         mamba_d_conv=s.conv_kernel, mamba_chunk_size=s.chunk_size)
        return GraniteMoeHybridConfig(
            **common_config(t), intermediate_size=t.intermediate_size, shared_intermediate_size=t.intermediate_size,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=self.shape.num_kv_heads,
            num_local_experts=0, num_experts_per_tok=0, attention_multiplier=self.shape.head_dim ** -0.5,
            embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0, attention_bias=self.attn_bias,
            attention_dropout=0.0, position_embedding_type="rope" if ATTENTION in kinds else None,
            rope_parameters=dict(t.rope_parameters), mamba_conv_bias=True, mamba_proj_bias=True,
            layer_types=["full_attention" if k == ATTENTION else "linear_attention" for k in kinds], **extra,
        )

    def route(self, name: str) -> tuple[str, str]:
        parts = name.split(".")
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            return "copy", name
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            return "unknown", name
        idx, module = parts[2], parts[3]
        if module in ("input_layernorm", "post_attention_layernorm"):
            return "copy", name
        if module == self.family.attention_attr:
            return "group", f"mixer.{idx}"
        if module == "mlp" and parts[4] == "down_proj":
            return "copy", f"model.layers.{idx}.shared_mlp.output_linear.weight"
        if module == "mlp" and parts[4] in ("gate_proj", "up_proj", "gate_up_proj"):
            return "group", f"mlp.{idx}"
        return "unknown", name

    def build(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, idx = key.split(".")
        prefix = f"model.layers.{idx}."
        if kind == "mlp":
            fused = tensors.get(prefix + "mlp.gate_up_proj.weight")
            if fused is None:
                fused = torch.cat([tensors[prefix + "mlp.gate_proj.weight"], tensors[prefix + "mlp.up_proj.weight"]])
            return {prefix + "shared_mlp.input_linear.weight": fused.contiguous()}
        i = int(idx)
        if self.plan[i][0] == ATTENTION:
            attn = read_attention(self.family, self.shape, i, tensors.get)
            out = {"q_proj.weight": attn.q, "k_proj.weight": attn.k, "v_proj.weight": attn.v, "o_proj.weight": attn.o}
            if self.attn_bias:
                for role, t in (("q", attn.q), ("k", attn.k), ("v", attn.v), ("o", attn.o)):
                    bias = getattr(attn, f"{role}_bias")
                    out[f"{role}_proj.bias"] = bias if bias is not None else t.new_zeros(t.shape[0])
            return {prefix + "self_attn." + n: t.contiguous() for n, t in out.items()}
        mixer = prefix + self.family.attention_attr + "."
        state = {n[len(mixer):]: t for n, t in tensors.items()}
        return {prefix + "mamba." + n: t for n, t in self._mamba(state, self.plan[i][1]).items()}

    def _mamba(self, state: dict[str, torch.Tensor], s) -> dict[str, torch.Tensor]:
        """One Mamba-2 mixer's state (our names) → Granite's ``mamba`` tensors."""
        H, G, P, N = s.n_heads, s.n_groups, s.head_dim, s.d_state
        rep = H // G
        ref = state["x_proj.weight"]

        def per_head(t, width):  # rows of G groups of ``width`` → H heads (each group repeated for its heads)
            return t.reshape(G, width, *t.shape[1:]).repeat_interleave(rep, 0).reshape(H * width, *t.shape[1:])

        if s.norm == "gated":
            z_w, z_b = state["z_proj.weight"], state["z_proj.bias"]
        else:
            z_w, z_b = ref.new_zeros(H * P, ref.shape[1]), ref.new_full((H * P,), SILU_INVERSE_OF_ONE)
        x_dim, b_dim = G * P, G * N

        def bias(name, rows):
            return state.get(name, ref.new_zeros(rows))

        in_w = torch.cat([z_w, per_head(state["x_proj.weight"], P), per_head(state["b_proj.weight"], N),
                          state["c_proj.weight"], state["dt_proj.weight"]])
        in_b = torch.cat([z_b.to(ref.dtype), per_head(bias("x_proj.bias", x_dim), P),
                          per_head(bias("b_proj.bias", b_dim), N), bias("c_proj.bias", H * N), ref.new_zeros(H)])
        conv_w, conv_b = state["conv1d.weight"], state["conv1d.bias"]
        parts = torch.split(conv_w, [x_dim, b_dim, H * N]), torch.split(conv_b, [x_dim, b_dim, H * N])
        conv_w = torch.cat([per_head(parts[0][0], P), per_head(parts[0][1], N), parts[0][2]])
        conv_b = torch.cat([per_head(parts[1][0], P), per_head(parts[1][1], N), parts[1][2]])
        out_w = state["out_proj.weight"]
        return {
            "in_proj.weight": like(in_w, ref), "in_proj.bias": like(in_b, ref),
            "conv1d.weight": like(conv_w, ref), "conv1d.bias": like(conv_b, ref),
            "dt_bias": state["dt_proj.bias"].contiguous(), "A_log": state["A_log"].contiguous(),
            "D": state["D"].contiguous(),
            "norm.weight": like(state["norm_weight"], ref),
            "out_proj.weight": out_w.contiguous(),
            "out_proj.bias": like(state.get("out_proj.bias", out_w.new_zeros(out_w.shape[0])), ref),
        }
