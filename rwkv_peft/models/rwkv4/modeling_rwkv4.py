"""RWKV-4 as a transformers model (our own classes, sharing ``models/common.py`` with RWKV-5/6/7).

Shapes: B batch, T tokens, C = hidden_size, A = attention_hidden_size (the WKV channels; C in every released
model), F = intermediate_size, V vocab.

Time mix (official ``att_seq`` / ``att_one``): token mixes ``x * m + prev * (1 - m)`` for k, v, r;
``r = sigmoid(receptance(xr))``, ``k = key(xk)``, ``v = value(xv)`` (k and v in fp32 for the recurrence);
``wkv`` of ``ops/wkv4.py`` with ``w = -exp(time_decay)`` (formed in fp32, as the package does at load) and
``u = time_first``; output ``output(r * wkv)``. No heads, no group norm, no gate. Channel mix: RWKV-4's own
(``time_mix_k`` / ``time_mix_r``, squared ReLU, receptance gate), the one RWKV-5 kept.

The recurrent state of one layer is ``(att_shift [B, C], wkv [B, 3, A], ffn_shift [B, C])``, all fp32, where
``wkv[:, 0] = aa``, ``wkv[:, 1] = bb``, ``wkv[:, 2] = pp``: the official package's per-layer ``att_aa``,
``att_bb``, ``att_pp`` (its state list holds them as ``state[5 * i + 1 .. 5 * i + 3]``) stacked in one tensor.
An empty state is ``(0, 0, -1e30)`` (``init_state``), as the package starts one. ``forward`` takes it
(``state=``) and returns it, so a long sequence run in chunks gives the logits of one pass, and ``generate``
uses it as its cache.

``attention_mask`` zeros mark padding anywhere in a row: a padded token leaves every state untouched (it writes
nothing and does not decay the WKV state; token shift skips it), so left-padded batched prompts generate exactly
as each prompt alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from ...ops.wkv4 import empty_state, wkv4
from ..common import (
    RWKVBlock, RWKVCausalLMOutput, RWKVGenerationMixin, RWKVModelMixin, RWKVOutput, init_shared_weights, token_shift,
)
from ..rows import Rows
from .configuration_rwkv4 import RWKV4Config

MIX_NAMES = ("k", "v", "r")  # time_mix_* of the time mix, in the official definition order


def _mix(x: torch.Tensor, prev: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The official v4/v5 token mix ``x * m + prev * (1 - m)``."""
    return x * m + prev * (1 - m)


class RWKV4TimeMix(nn.Module):
    def __init__(self, config: RWKV4Config, layer_idx: int):
        super().__init__()
        C, A = config.hidden_size, config.attention_hidden_size
        self.layer_idx, self.attention_hidden_size = layer_idx, A
        for name in MIX_NAMES:
            setattr(self, f"time_mix_{name}", nn.Parameter(torch.zeros(C)))
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def initial_wkv(self) -> Optional[torch.Tensor]:
        return None  # no state tuning for RWKV-4 (see versions.py)

    def blank_wkv(self) -> torch.Tensor:
        """The empty WKV state ``(aa, bb, pp) = (0, 0, -1e30)`` as ``[3, A]``."""
        return empty_state(1, self.attention_hidden_size, device=self.receptance.weight.device)[0]

    def forward(self, x, carry, shift: Optional[torch.Tensor], wkv_state: Optional[torch.Tensor],
                rows: Optional[Rows]):
        x_prev, shift_out = token_shift(x, shift, rows)
        k = self.key(_mix(x, x_prev, self.time_mix_k))
        v = self.value(_mix(x, x_prev, self.time_mix_v))
        r = torch.sigmoid(self.receptance(_mix(x, x_prev, self.time_mix_r)))
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()       # log decay [A], fp32

        def run(tensors, mask, initial_state):  # the op skips padding (mask 0): no write, no decay
            return wkv4(w, u, *tensors, initial_state=initial_state, mask=mask)

        y, wkv_out = (rows or Rows()).run_wkv(run, (k.float(), v.float()), wkv_state, None, self.blank_wkv)
        return self.output(r * y.to(r.dtype)), carry, shift_out, wkv_out


class RWKV4ChannelMix(nn.Module):
    def __init__(self, config: RWKV4Config, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)

    def forward(self, x, shift: Optional[torch.Tensor], rows: Optional[Rows], tokens=None):
        x_prev, shift_out = token_shift(x, shift, rows)
        k = torch.relu(self.key(_mix(x, x_prev, self.time_mix_k))) ** 2
        r = torch.sigmoid(self.receptance(_mix(x, x_prev, self.time_mix_r)))
        return r * self.value(k), shift_out


class RWKV4Block(RWKVBlock):
    time_mix_class, channel_mix_class = RWKV4TimeMix, RWKV4ChannelMix


class RWKV4PreTrainedModel(PreTrainedModel):
    config_class = RWKV4Config
    config: RWKV4Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV4Block"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Random init as in the official v4 training code (used by ``from_config``)."""
        cfg = self.config
        if isinstance(module, RWKV4TimeMix):
            L, i, C, A = cfg.num_hidden_layers, module.layer_idx, cfg.hidden_size, cfg.attention_hidden_size
            r01 = i / max(L - 1, 1)                     # 0 at the first layer, 1 at the last
            r1a0 = 1.0 - i / L                          # 1 at the first layer, towards 0 at the last
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.time_mix_k, ddd ** r1a0)
            init.copy_(module.time_mix_v, ddd ** r1a0 + 0.3 * r01)
            init.copy_(module.time_mix_r, ddd ** (0.5 * r1a0))
            h = torch.arange(A, dtype=torch.float32)
            init.copy_(module.time_decay, -5 + 8 * (h / max(A - 1, 1)) ** (0.7 + 1.3 * r01))
            zigzag = ((h + 1) % 3 - 1) * 0.5
            init.copy_(module.time_first, torch.full((A,), 0.3).log() + zigzag)
            for lin in (module.receptance, module.key, module.value):
                init.uniform_(lin.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.output.weight)
        elif isinstance(module, RWKV4ChannelMix):
            C = cfg.hidden_size
            r1a0 = 1.0 - module.layer_idx / cfg.num_hidden_layers
            ddd = torch.arange(C, dtype=torch.float32) / C
            init.copy_(module.time_mix_k, ddd ** r1a0)
            init.copy_(module.time_mix_r, ddd ** r1a0)
            init.uniform_(module.key.weight, -0.5 / C ** 0.5, 0.5 / C ** 0.5)
            init.zeros_(module.receptance.weight)
            init.zeros_(module.value.weight)
        else:
            init_shared_weights(module, cfg)


class RWKV4Model(RWKVModelMixin, RWKV4PreTrainedModel):
    def __init__(self, config: RWKV4Config):
        super().__init__(config)
        C = config.hidden_size
        self.emb = nn.Embedding(config.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([RWKV4Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()


class RWKV4ForCausalLM(RWKVGenerationMixin, RWKV4PreTrainedModel):
    def __init__(self, config: RWKV4Config):
        super().__init__(config)
        self.model = RWKV4Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


RWKV4Output, RWKV4CausalLMOutput = RWKVOutput, RWKVCausalLMOutput  # the shared outputs, under v4 names
