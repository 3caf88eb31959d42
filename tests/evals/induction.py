"""A 2-layer Llama whose weights are set by hand to an induction circuit that solves MQAR.

Elhage et al., "A Mathematical Framework for Transformer Circuits" (2021): a previous-token head
followed by an induction head retrieves "the token that followed this one last time", which is
exactly associative recall. Residual stream (hidden 128): one-hot of the token in dims [0, V), of
the previous token in [V, 2V) (written by layer 0), of the recalled token in [2V, 3V) (written by
layer 1, read by the LM head), and a constant 1 in dim 3V. MLPs are zeroed.

- Layer 0 attends from position n to n-1: its query and key are constant vectors in RoPE's
  highest-frequency pairs, the key rotated one step ahead, so the score is
  ``sum_j a^2 cos((1 - (n - m)) theta_j)``, largest at ``n - m = 1``.
- Layer 1 matches the current token against each position's previous token minus its own token
  (position 0 can only attend to itself, so its "previous token" is its own) in RoPE's
  lowest-frequency pairs (rotation angles below 1e-3 over 512 positions: content, not position),
  and copies the matched position's token.

Nothing is trained, so the circuit is exact and instant; converting it with
``keep_attention=1.0`` must give the same accuracy, and replacing its attention must not be assumed to.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HIDDEN = HEAD_DIM = 128
ROPE_THETA = 1e7
POSITION_PAIRS = 8  # highest-frequency RoPE pairs used by the previous-token head
SHARPNESS = 25.0  # softmax logit margin of the intended position over the runner-up


def induction_llama(vocab_size: int = 32, max_positions: int = 512) -> LlamaForCausalLM:
    V = vocab_size
    if 3 * V + 1 > HIDDEN or V > HEAD_DIM // 4:
        raise ValueError(f"vocab {V} does not fit the hand-built layout")
    config = LlamaConfig(vocab_size=V, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=HEAD_DIM, rms_norm_eps=1e-12,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    model = LlamaForCausalLM(config).eval()
    tok, prev, recalled, const = 0, V, 2 * V, 3 * V
    half = HEAD_DIM // 2
    theta = ROPE_THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    eye = torch.eye(V)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.model.norm] + [n for layer in model.model.layers
                                          for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, tok : tok + V] = eye
        model.model.embed_tokens.weight[:, const] = 1.0

        # Layer 0 sees e_t + e_const, whose RMS normalisation multiplies by sqrt(HIDDEN / 2).
        attn0, s0 = model.model.layers[0].self_attn, math.sqrt(HIDDEN / 2)
        margin = _position_margin(theta[:POSITION_PAIRS], max_positions)
        a = math.sqrt(SHARPNESS * math.sqrt(HEAD_DIM) / margin)
        for j in range(POSITION_PAIRS):
            attn0.q_proj.weight[j, const] = a / s0
            attn0.k_proj.weight[j, const] = a * math.cos(theta[j]) / s0
            attn0.k_proj.weight[j + half, const] = a * math.sin(theta[j]) / s0
        attn0.v_proj.weight[:V, tok : tok + V] = eye / s0
        attn0.o_proj.weight[prev : prev + V, :V] = eye

        # Layer 1 sees e_t + e_prev + e_const: RMS normalisation multiplies by sqrt(HIDDEN / 3).
        attn1, s1 = model.model.layers[1].self_attn, math.sqrt(HIDDEN / 3)
        content = [half - V // 2 + i for i in range(V // 2)] + [HEAD_DIM - (V - V // 2) + i for i in range(V - V // 2)]
        alpha = SHARPNESS * math.sqrt(HEAD_DIM)
        for i, d in enumerate(content):
            attn1.q_proj.weight[d, tok + i] = alpha / s1
            attn1.k_proj.weight[d, prev + i] = 1.0 / s1
            attn1.k_proj.weight[d, tok + i] = -1.0 / s1  # position 0 is its own "previous" token: cancel it
        attn1.v_proj.weight[:V, tok : tok + V] = eye / s1
        attn1.o_proj.weight[recalled : recalled + V, :V] = eye
        model.lm_head.weight[:, recalled : recalled + V] = eye
    return model


def _position_margin(theta: torch.Tensor, max_positions: int) -> float:
    """Score of offset 1 minus the best other offset in [0, max_positions), per unit ``a^2``."""
    offsets = torch.arange(max_positions, dtype=torch.float64)
    score = torch.cos((1 - offsets)[:, None] * theta[None, :]).sum(1)
    return (score[1] - torch.cat([score[:1], score[2:]]).max()).item()
