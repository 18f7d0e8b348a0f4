"""RWKV-5.2 "Eagle" as a transformers model.

Shapes: B batch, T tokens, C = hidden_size, H heads of N = head_size channels (C = H * N), V vocab.

RWKV-5.2 is RWKV-6 without the data dependence: the token mixes are fixed per channel (``x * m + prev * (1 - m)``,
the official v5 form) and the decay ``exp(-exp(time_decay))`` (``time_decay`` ``[H, N]``) is the same at every
token. The channel mix is RWKV-4's (``time_mix_k`` / ``time_mix_r``).

The recurrent state of one layer is ``(att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C])``, all fp32, the
WKV state laid out ``S[h, key, value]`` as in the official package's v5 state. ``forward`` takes it (``state=``)
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

from ...ops.wkv5 import wkv5
from ..common import (
    INITIAL_STATE_KEYS, MatrixStateMixin, RWKVBlock, RWKVCausalLMOutput, RWKVGenerationMixin, RWKVModelMixin,
    RWKVOutput, init_initial_states, init_shared_weights, initial_shift, token_shift,
)
from ..rows import Rows
from .configuration_rwkv5 import RWKV5Config

MIX_NAMES = ("k", "v", "r", "g")  # time_mix_* of the time mix, in the official definition order


def _mix(x: torch.Tensor, prev: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The official v4/v5 token mix ``x * m + prev * (1 - m)`` (RWKV-6/7 write ``x + (prev - x) * m``)."""
    return x * m + prev * (1 - m)


class RWKV5TimeMix(MatrixStateMixin, nn.Module):
    version_name = "rwkv5"

    def __init__(self, config: RWKV5Config, layer_idx: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_idx, self.num_heads, self.head_size = layer_idx, H, N
        for name in MIX_NAMES:
            setattr(self, f"time_mix_{name}", nn.Parameter(torch.zeros(C)))
        self.time_decay = nn.Parameter(torch.zeros(H, N))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=config.head_norm_eps)
        self.time_state = nn.Parameter(torch.zeros(H, N, N)) if config.use_initial_state else None
        self.shift_state = initial_shift(config)

    def forward(self, x, carry, shift: Optional[torch.Tensor], wkv_state: Optional[torch.Tensor],
                rows: Optional[Rows]):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        x_prev, shift_out = token_shift(x, shift, rows, self.shift_state)
        r = self.receptance(_mix(x, x_prev, self.time_mix_r))
        k = self.key(_mix(x, x_prev, self.time_mix_k))
        v = self.value(_mix(x, x_prev, self.time_mix_v))
        g = F.silu(self.gate(_mix(x, x_prev, self.time_mix_g)))
        w = -torch.exp(self.time_decay.float())                                   # log decay [H, N], fp32

        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        u = self.time_faaaa

        def run(tensors, mask, initial_state):  # padding (mask 0) leaves the state untouched: no write, no decay
            r, k, v = tensors
            decay = w
            if mask is not None:  # w per token then
                m = mask.to(k.dtype)[..., None, None]
                k, v = k * m, v * m
                decay = torch.where(m.bool(), w, 0.0)                                   # [B, T, H, N]
            return wkv5(r, decay, k, v, u, initial_state=initial_state)

        o, wkv_out = (rows or Rows()).run_wkv(run, (heads(r), heads(k), heads(v)), wkv_state, self.initial_wkv(),
                                              self.blank_wkv)
        o = self.ln_x(o.reshape(B * T, C)).view(B, T, C)
        return self.output(o * g), carry, shift_out, wkv_out


class RWKV5ChannelMix(nn.Module):
    def __init__(self, config: RWKV5Config, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)
        self.shift_state = initial_shift(config)

    def forward(self, x, shift: Optional[torch.Tensor], rows: Optional[Rows], tokens=None):
        x_prev, shift_out = token_shift(x, shift, rows, self.shift_state)
        k = torch.relu(self.key(_mix(x, x_prev, self.time_mix_k))) ** 2
        r = torch.sigmoid(self.receptance(_mix(x, x_prev, self.time_mix_r)))
        return r * self.value(k), shift_out


class RWKV5Block(RWKVBlock):
    time_mix_class, channel_mix_class = RWKV5TimeMix, RWKV5ChannelMix


class RWKV5PreTrainedModel(PreTrainedModel):
    config_class = RWKV5Config
    config: RWKV5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV5Block"]
    _is_stateful = True
    _keys_to_ignore_on_load_missing = INITIAL_STATE_KEYS

    @torch.no_grad()
    def _init_weights(self, module):
        """Random init as in the official v5 training code (used by ``from_config``)."""
        cfg = self.config
        if isinstance(module, RWKV5TimeMix):
            L, i, C = cfg.num_hidden_layers, module.layer_idx, cfg.hidden_size
            r01 = i / max(L - 1, 1)                     # 0 at the first layer, 1 at the last
            r1a0 = 1.0 - i / L                          # 1 at the first layer, towards 0 at the last
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.time_mix_k, ddd ** r1a0)
            init.copy_(module.time_mix_v, ddd ** r1a0 + 0.3 * r01)
            init.copy_(module.time_mix_r, ddd ** (0.5 * r1a0))
            init.copy_(module.time_mix_g, ddd ** (0.5 * r1a0))
            n = torch.arange(C, dtype=torch.float32)
            decay = -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01)
            init.copy_(module.time_decay, decay.view_as(module.time_decay))
            bonus = r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
            init.copy_(module.time_faaaa, bonus.view_as(module.time_faaaa))
            for lin in (module.receptance, module.key, module.value, module.gate):
                init.uniform_(lin.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.output.weight)
            init.ones_(module.ln_x.weight)
            init.zeros_(module.ln_x.bias)
            init_initial_states(module)
        elif isinstance(module, RWKV5ChannelMix):
            C = cfg.hidden_size
            r1a0 = 1.0 - module.layer_idx / cfg.num_hidden_layers
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.time_mix_k, ddd ** r1a0)
            init.copy_(module.time_mix_r, ddd ** r1a0)
            init.uniform_(module.key.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.receptance.weight)
            init.zeros_(module.value.weight)
            init_initial_states(module)
        else:
            init_shared_weights(module, cfg)


class RWKV5Model(RWKVModelMixin, RWKV5PreTrainedModel):
    def __init__(self, config: RWKV5Config):
        super().__init__(config)
        C = config.hidden_size
        self.emb = nn.Embedding(config.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([RWKV5Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()


class RWKV5ForCausalLM(RWKVGenerationMixin, RWKV5PreTrainedModel):
    def __init__(self, config: RWKV5Config):
        super().__init__(config)
        self.model = RWKV5Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


RWKV5Output, RWKV5CausalLMOutput = RWKVOutput, RWKVCausalLMOutput  # the shared outputs, under v5 names
