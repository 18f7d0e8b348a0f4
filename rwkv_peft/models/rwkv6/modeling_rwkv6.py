"""RWKV-6 "Finch" as a transformers model.

Shapes: B batch, T tokens, C = hidden_size, H heads of N = head_size channels (C = H * N), V vocab.

The recurrent state of one layer is ``(att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C])``, all fp32, the
WKV state laid out ``S[h, key, value]`` as in the official package's v6 state. ``forward`` takes it (``state=``)
and returns it, so a long sequence run in chunks gives the logits of one pass, and ``generate`` uses it as its
cache.

``att.time_state`` (with ``config.use_initial_state``) is kept in the layout of state files and of the
``.pth`` key ``blocks.N.att.time_state``, ``[h, value, key]``; the model starts from its transpose, as the
official package does.

``attention_mask`` zeros mark padding anywhere in a row: a padded token leaves every state untouched (its key
and value are zeroed with decay 1, and token shift skips it), so left-padded batched prompts generate exactly
as each prompt alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers import PreTrainedModel

from ...ops.wkv6 import takes_cu_seqlens, wkv6
from ..common import (
    INITIAL_STATE_KEYS, LowRank, MatrixStateMixin, RWKVBlock, RWKVCausalLMOutput, RWKVGenerationMixin,
    RWKVModelMixin, RWKVOutput, init_initial_states, init_shared_weights, initial_shift, token_shift,
)
from ..rows import Rows
from .configuration_rwkv6 import RWKV6Config

MIX_NAMES = ("w", "k", "v", "r", "g")  # the order of the five data-dependent mixes in time_maa_w1 / w2


class MixLowRank(nn.Module):
    """The five data-dependent token-mix offsets: ``up[i] . tanh(down(x))[i]`` for i in w, k, v, r, g.

    ``down`` is ``Linear(C, 5 * D)`` (weight = ``.pth time_maa_w1`` transposed); ``up`` is ``[5, D, C]``
    (``time_maa_w2`` as it is).
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(dim, 5 * rank, bias=False)
        self.up = nn.Parameter(torch.zeros(5, rank, dim))

    def forward(self, x):
        h = torch.tanh(self.down(x)).unflatten(-1, (5, self.rank))               # [B, T, 5, D]
        return torch.einsum("btfd,fdc->fbtc", h, self.up.to(h.dtype)).unbind(0)  # 5 x [B, T, C]


class RWKV6TimeMix(MatrixStateMixin, nn.Module):
    version_name = "rwkv6"

    def __init__(self, config: RWKV6Config, layer_idx: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_idx, self.num_heads, self.head_size = layer_idx, H, N
        for name in ("x",) + MIX_NAMES:
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(C)))
        self.maa_lora = MixLowRank(C, config.mix_low_rank)
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.decay_lora = LowRank(C, config.decay_low_rank)
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=config.head_norm_eps)
        self.time_state = nn.Parameter(torch.zeros(H, N, N)) if config.use_initial_state else None
        self.shift_state = initial_shift(config)

    def forward(self, x, carry, shift: Optional[torch.Tensor], wkv_state: Optional[torch.Tensor],
                rows: Optional[Rows]):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        x_prev, shift_out = token_shift(x, shift, rows, self.shift_state)
        xx = x_prev - x
        mw, mk, mv, mr, mg = self.maa_lora(x + xx * self.time_maa_x)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        w = -torch.exp((self.time_decay + self.decay_lora(xw, torch.tanh)).float())   # log decay, fp32

        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        u = self.time_faaaa

        def run(tensors, mask, initial_state, cu_seqlens=None):  # padding (mask 0): no write, no decay
            r, w, k, v = tensors
            if mask is not None:
                m = mask.to(k.dtype)[..., None, None]
                k, v, w = k * m, v * m, torch.where(m.bool(), w, 0.0)
            return wkv6(r, w, k, v, u, initial_state=initial_state, cu_seqlens=cu_seqlens)

        rows = rows or Rows()
        o, wkv_out = rows.run_wkv(run, (heads(r), heads(w), heads(k), heads(v)), wkv_state, self.initial_wkv(),
                                  self.blank_wkv, rows.segments is not None and takes_cu_seqlens(x.device))
        o = self.ln_x(o.reshape(B * T, C)).view(B, T, C)
        return self.output(o * g), carry, shift_out, wkv_out


class RWKV6ChannelMix(nn.Module):
    def __init__(self, config: RWKV6Config, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.time_maa_k = nn.Parameter(torch.zeros(C))
        self.time_maa_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)
        self.shift_state = initial_shift(config)

    def forward(self, x, shift: Optional[torch.Tensor], rows: Optional[Rows], tokens=None):
        x_prev, shift_out = token_shift(x, shift, rows, self.shift_state)
        xx = x_prev - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2
        r = torch.sigmoid(self.receptance(x + xx * self.time_maa_r))
        return r * self.value(k), shift_out


class RWKV6Block(RWKVBlock):
    time_mix_class, channel_mix_class = RWKV6TimeMix, RWKV6ChannelMix


class RWKV6PreTrainedModel(PreTrainedModel):
    config_class = RWKV6Config
    config: RWKV6Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV6Block"]
    _is_stateful = True
    _keys_to_ignore_on_load_missing = INITIAL_STATE_KEYS

    @torch.no_grad()
    def _init_weights(self, module):
        """Random init in the spirit of the official v6 training code (used by ``from_config``)."""
        cfg = self.config
        if isinstance(module, RWKV6TimeMix):
            L, i, C = cfg.num_hidden_layers, module.layer_idx, cfg.hidden_size
            r01 = i / max(L - 1, 1)                     # 0 at the first layer, 1 at the last
            r1a0 = 1.0 - i / L                          # 1 at the first layer, towards 0 at the last
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.time_maa_x, 1.0 - ddd ** r1a0)
            init.copy_(module.time_maa_w, 1.0 - ddd ** r1a0)
            init.copy_(module.time_maa_k, 1.0 - ddd ** r1a0)
            init.copy_(module.time_maa_v, 1.0 - (ddd ** r1a0 + 0.3 * r01))
            init.copy_(module.time_maa_r, 1.0 - ddd ** (0.5 * r1a0))
            init.copy_(module.time_maa_g, 1.0 - ddd ** (0.5 * r1a0))
            init.zeros_(module.maa_lora.down.weight)
            init.uniform_(module.maa_lora.up, -0.01, 0.01)
            n = torch.arange(C, dtype=torch.float32)
            init.copy_(module.time_decay, -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01))
            init.zeros_(module.decay_lora.down.weight)
            init.uniform_(module.decay_lora.up.weight, -0.01, 0.01)
            bonus = r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
            init.copy_(module.time_faaaa, bonus.view_as(module.time_faaaa))
            for lin in (module.receptance, module.key, module.value, module.gate):
                init.uniform_(lin.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.output.weight)
            init.constant_(module.ln_x.weight, ((1 + i) / L) ** 0.7)
            init.zeros_(module.ln_x.bias)
            init_initial_states(module)
        elif isinstance(module, RWKV6ChannelMix):
            C = cfg.hidden_size
            r1a0 = 1.0 - module.layer_idx / cfg.num_hidden_layers
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.time_maa_k, 1.0 - ddd ** r1a0)
            init.copy_(module.time_maa_r, 1.0 - ddd ** r1a0)
            init.uniform_(module.key.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.receptance.weight)
            init.zeros_(module.value.weight)
            init_initial_states(module)
        else:
            init_shared_weights(module, cfg)


class RWKV6Model(RWKVModelMixin, RWKV6PreTrainedModel):
    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        C = config.hidden_size
        self.emb = nn.Embedding(config.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([RWKV6Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()


class RWKV6ForCausalLM(RWKVGenerationMixin, RWKV6PreTrainedModel):
    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        self.model = RWKV6Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


RWKV6Output, RWKV6CausalLMOutput = RWKVOutput, RWKVCausalLMOutput  # names kept for callers
