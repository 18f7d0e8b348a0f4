"""RWKV-7 "Goose" as a transformers model.

Shapes: B batch, T tokens, C = hidden_size, H heads of N = head_size channels (C = H * N), V vocab.

The recurrent state of one layer is ``(att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C])``, all fp32, the
WKV state laid out ``[value, key]`` as in the official package. ``forward`` takes it (``state=``) and returns
it, so a long sequence run in chunks gives the logits of one pass, and ``generate`` uses it as its cache.

``attention_mask`` zeros mark padding anywhere in a row: a padded token leaves every state untouched (its WKV
inputs are zeroed with decay 1, and token shift skips it), so left-padded batched prompts generate exactly as
each prompt alone.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers import PreTrainedModel

from ...ops.wkv7 import takes_cu_seqlens, wkv7
from ..common import (
    LowRank, RWKVBlock, RWKVCausalLMOutput, RWKVGenerationMixin, RWKVModelMixin, RWKVOutput, init_shared_weights,
    INITIAL_STATE_KEYS, init_initial_states, initial_shift, token_shift,
)
from ..rows import Rows
from .configuration_rwkv7 import RWKV7Config

DECAY_SCALE = math.exp(-0.5)  # the decay is exp(-exp(-0.5) * sigmoid(.)), in (0.545, 1)


class RWKV7TimeMix(nn.Module):
    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_idx, self.num_heads, self.head_size = layer_idx, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.w_lora = LowRank(C, config.decay_low_rank)
        self.a_lora = LowRank(C, config.a_low_rank)
        self.v_lora = LowRank(C, config.v_low_rank)     # unused in layer 0 (kept for lossless conversion)
        self.g_lora = LowRank(C, config.gate_low_rank)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=config.head_norm_eps)
        self.time_state = nn.Parameter(torch.zeros(H, N, N)) if config.use_initial_state else None
        self.shift_state = initial_shift(config)

    def initial_wkv(self) -> Optional[torch.Tensor]:
        """The learned initial WKV state [H, N, N] in the op's layout (state tuning), or None."""
        return self.time_state

    def blank_wkv(self) -> torch.Tensor:
        return torch.zeros(self.num_heads, self.head_size, self.head_size, device=self.receptance.weight.device)

    def forward(self, x, v_first, shift: Optional[torch.Tensor], wkv_state: Optional[torch.Tensor],
                rows: Optional[Rows]):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        x_prev, shift_out = token_shift(x, shift, rows, self.shift_state)
        xx = x_prev - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        w = -DECAY_SCALE * torch.sigmoid((self.w0 + self.w_lora(xw, torch.tanh)).float())  # log decay, fp32
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + self.a_lora(xa))
        g = self.g_lora(xg, torch.sigmoid)

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)           # [B, T, H, N]
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_idx == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + self.v_lora(xv))

        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        rows = rows or Rows()
        varlen = rows.segments is not None and takes_cu_seqlens(x.device)
        o, wkv_out = rows.run_wkv(_wkv, (heads(r), heads(w), heads(k), heads(v), kk, heads(a)), wkv_state,
                                  self.time_state, self.blank_wkv, varlen)
        o = self.ln_x(o.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)  # [B, T, H, N]
        o = o + bonus.reshape(B, T, C)
        return self.output(o * g), v_first, shift_out, wkv_out


def _wkv(tensors, mask, initial_state, cu_seqlens=None):
    """The WKV-7 op on ``r, w, k, v, kk, a`` [B, T, H, N]; padding (``mask`` 0) leaves the state untouched: no
    write, no decay, no delta. The log decay, computed in fp32, goes in at the dtype of the other five inputs:
    rounded to bf16 it keeps the op's error within the band that bf16 r, k, v, a, b set (measured against float64
    over 4096 tokens, decays near 1 and at the model's lowest included: docs/kernels.md "Decay precision"), and
    a kernel then reads its inputs as they are, without fp32 copies."""
    r, w, k, v, kk, a = tensors
    w = w.to(k.dtype)
    if mask is not None:
        m = mask.to(k.dtype)[..., None, None]
        k, v, w, kk = k * m, v * m, w * m, kk * m
    return wkv7(r, w, k, v, -kk, kk * a, initial_state=initial_state, cu_seqlens=cu_seqlens)


class HostEmbedding(nn.Embedding):
    """An embedding table that stays in CPU memory when the model moves to a GPU (``.to``, ``.cuda``): DeepEmbed's
    per-layer ``[V, R*R]`` tables are far larger than the model's other weights and are read a few rows at a
    time, so each forward gathers its tokens' rows on the CPU and sends only those. Dtype changes still apply."""

    def _apply(self, fn, recurse=True):
        dtype = fn(torch.empty(0, dtype=self.weight.dtype)).dtype  # what the move asks for, minus the device
        if self.weight.device.type != "cpu" or dtype != self.weight.dtype:
            self.weight.data = self.weight.data.to("cpu", dtype)
            if self.weight.grad is not None:
                self.weight.grad.data = self.weight.grad.data.to("cpu", dtype)
        return self

    def forward(self, ids):
        return super().forward(ids.to(self.weight.device))


class RWKV7ChannelMix(nn.Module):
    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        C, F, R = config.hidden_size, config.intermediate_size, config.deep_embed_rank
        self.layer_idx = layer_idx
        self.x_k = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, F, bias=False)
        self.value = nn.Linear(F, C, bias=False)
        if R:  # DeepEmbed: a per-token R x R matrix scales the key (see RWKV7Config)
            table = HostEmbedding if config.deep_embed_on_cpu else nn.Embedding
            self.s_emb = table(config.vocab_size, R * R)
            self.s_emb_x = nn.Linear(C, R * R, bias=False)
            self.s1 = nn.Parameter(torch.zeros(C, R))
            self.s2 = nn.Parameter(torch.zeros(R, F))
            self.s0 = nn.Parameter(torch.zeros(F))
        self.shift_state = initial_shift(config)

    def forward(self, x, shift: Optional[torch.Tensor], rows: Optional[Rows], tokens=None):
        x_prev, shift_out = token_shift(x, shift, rows, self.shift_state)
        k = torch.relu(self.key(x + (x_prev - x) * self.x_k)) ** 2                  # [B, T, F]
        if hasattr(self, "s_emb"):
            k = k * self.deep_embed_scale(x, tokens)
        return self.value(k), shift_out

    def deep_embed_scale(self, x, tokens):
        """``((x @ s1) @ S_token) @ s2 + s0`` [B, T, F]; ``tokens`` = (ids [B, T], ln0(emb(ids)) [B, T, C])."""
        ids, x0 = tokens
        B, T, _ = x.shape
        R = self.s1.shape[1]
        table = self.s_emb(ids).to(x.device) + self.s_emb_x(x0)                      # [B, T, R*R]
        ss = (x @ self.s1).unsqueeze(-2) @ table.view(B, T, R, R)                    # [B, T, 1, R]
        return ss.squeeze(-2) @ self.s2 + self.s0


class RWKV7Block(RWKVBlock):
    time_mix_class, channel_mix_class = RWKV7TimeMix, RWKV7ChannelMix


class RWKV7PreTrainedModel(PreTrainedModel):
    config_class = RWKV7Config
    config: RWKV7Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV7Block"]
    _is_stateful = True
    _keys_to_ignore_on_load_missing = INITIAL_STATE_KEYS

    @torch.no_grad()
    def _init_weights(self, module):
        """Random init in the spirit of the official training code (used by ``from_config``)."""
        cfg = self.config
        if isinstance(module, RWKV7TimeMix):
            L, i, C = cfg.num_hidden_layers, module.layer_idx, cfg.hidden_size
            r01 = i / max(L - 1, 1)
            r1a0 = 1.0 - i / L
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.x_r, 1.0 - ddd ** (0.2 * r1a0))
            init.copy_(module.x_w, 1.0 - ddd ** (0.9 * r1a0))
            init.copy_(module.x_k, 1.0 - ddd ** (0.7 * r1a0))
            init.copy_(module.x_v, 1.0 - ddd ** (0.7 * r1a0))
            init.copy_(module.x_a, 1.0 - ddd ** (0.9 * r1a0))
            init.copy_(module.x_g, 1.0 - ddd ** (0.2 * r1a0))
            n = torch.arange(C, dtype=torch.float32)
            init.copy_(module.w0, -6 + 5 * (n / (C - 1)) ** (1 + r01 ** 0.3) + 0.5)
            init.constant_(module.a0, 0.0)
            init.constant_(module.v0, 1.0)
            init.constant_(module.k_k, 0.85)
            init.constant_(module.k_a, 1.0)
            init.constant_(module.r_k, -0.04)
            for lora in (module.w_lora, module.a_lora, module.v_lora, module.g_lora):
                init.zeros_(lora.down.weight)
                init.orthogonal_(lora.up.weight, gain=0.1)
            for lin in (module.receptance, module.key, module.value):
                init.uniform_(lin.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.output.weight)
            init.constant_(module.ln_x.weight, ((1 + i) / L) ** 0.7)
            init.zeros_(module.ln_x.bias)
            init_initial_states(module)
        elif isinstance(module, RWKV7ChannelMix):
            C = cfg.hidden_size
            r1a0 = 1.0 - module.layer_idx / cfg.num_hidden_layers
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.x_k, 1.0 - ddd ** (r1a0 ** 4))
            init.uniform_(module.key.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.value.weight)
            init_initial_states(module)
            if hasattr(module, "s_emb"):  # DeepEmbed starts as the plain channel mix: scale 1
                init.zeros_(module.s_emb.weight)
                init.zeros_(module.s_emb_x.weight)
                init.zeros_(module.s1)
                init.zeros_(module.s2)
                init.ones_(module.s0)
        else:
            init_shared_weights(module, cfg)


class RWKV7Model(RWKVModelMixin, RWKV7PreTrainedModel):
    def _block_tokens(self, input_ids, x0):
        """DeepEmbed: what every channel mix indexes its table with (the ids and ln0 of their embedding)."""
        if not self.config.deep_embed_rank:
            return None
        if input_ids is None:
            raise ValueError("a DeepEmbed model needs input_ids (its tables are indexed by token), not inputs_embeds")
        return input_ids, x0

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        C = config.hidden_size
        self.emb = nn.Embedding(config.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([RWKV7Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()


class RWKV7ForCausalLM(RWKVGenerationMixin, RWKV7PreTrainedModel):
    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.model = RWKV7Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


RWKV7Output, RWKV7CausalLMOutput = RWKVOutput, RWKVCausalLMOutput  # names kept for callers
