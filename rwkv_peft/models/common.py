"""Pieces every RWKV version shares: token shift, low-rank maps, the chunked loss, outputs, the causal-LM head.

Each version's modeling file defines its time mix, channel mix, block and base model; its ``...ForCausalLM``
combines ``RWKVGenerationMixin`` (forward with labels, chunked loss, generation with the state as cache) with
``self.model`` and ``self.head``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .generation import StateGenerationMixin
from .rows import Rows, sample_starts
from .loss import chunked_causal_lm_loss, chunked_cross_entropy, shift_targets  # noqa: F401 (their home is loss.py)

LayerState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def token_shift(x: torch.Tensor, prev: Optional[torch.Tensor], rows: Optional[Rows] = None,
                initial: Optional[torch.Tensor] = None):
    """The previous token's ``x`` for every position, and the last one (the next shift state).

    x: [B, T, C]; prev: [B, C] or None (the sequence's initial shift state); initial: [C], the learned initial
    shift state (full-state tuning) or None (zeros). ``rows.mask`` [B, T] (1 = real token): padded positions are
    skipped, a token sees the last *real* token before it. ``rows.starts`` [B, T]: a token that starts a packed
    sample sees the initial shift state.
    """
    B, T, C = x.shape
    start = (lambda: x.new_zeros(C) if initial is None else initial.to(x.dtype))  # noqa: E731
    prev = start().expand(B, C) if prev is None else prev.to(x.dtype)
    mask = rows.mask if rows is not None else None
    if T == 1:  # one token (decoding): the previous token is the state, whether this one is padding or not
        shifted = prev[:, None]
        last = x[:, 0] if mask is None else torch.where(mask[:, :1].bool(), x[:, 0], prev)
    elif mask is None:
        shifted, last = torch.cat([prev[:, None], x[:, :-1]], dim=1), x[:, -1]
    else:
        xp = torch.cat([prev[:, None], x], dim=1)                               # [B, T+1, C]
        pos = torch.arange(1, T + 1, device=x.device).expand(B, T)
        last_real = torch.where(mask.bool(), pos, 0).cummax(dim=1).values       # [B, T] index into xp
        prev_idx = torch.cat([last_real.new_zeros(B, 1), last_real[:, :-1]], dim=1)
        shifted = xp.gather(1, prev_idx[..., None].expand(B, T, C))
        last = xp.gather(1, last_real[:, -1:, None].expand(B, 1, C))[:, 0]
    if rows is not None and rows.starts is not None:
        shifted = torch.where(rows.starts[..., None], start(), shifted)
    return shifted, last


def initial_shift(config, size: Optional[int] = None) -> Optional[nn.Parameter]:
    """The learned initial token-shift state ``[C]`` of a time or channel mix (full-state tuning), or None."""
    if not getattr(config, "use_initial_shift", False):
        return None
    return nn.Parameter(torch.zeros(size or config.hidden_size))


INITIAL_STATE_KEYS = [r"att\.time_state", r"att\.shift_state", r"ffn\.shift_state"]  # absent from checkpoints


@torch.no_grad()
def init_initial_states(module: nn.Module) -> None:
    """Zeros for a mix's learned initial states (``time_state``, ``shift_state``) where it has them."""
    for name in ("time_state", "shift_state"):
        p = getattr(module, name, None)
        if p is not None:
            init.zeros_(p)


class MatrixStateMixin:
    """``initial_wkv`` / ``blank_wkv`` of a time mix whose WKV state is ``[H, N, N]`` per head (RWKV-5, 6, 7).

    ``att.time_state`` (state tuning) is kept in the layout of state files; the op runs on the layout the
    version's registry entry names (``Version.state_to_op``). A class sets ``version_name``.
    """
    version_name: str = ""

    def initial_wkv(self) -> Optional[torch.Tensor]:
        """The learned initial WKV state in the op's layout (state tuning), or None."""
        if self.time_state is None:
            return None
        from .. import versions
        return versions.by_name(self.version_name).state_to_op(self.time_state)

    def blank_wkv(self) -> torch.Tensor:
        """The WKV state of an empty sequence: zeros ``[H, N, N]``."""
        return torch.zeros(self.num_heads, self.head_size, self.head_size, device=self.receptance.weight.device)


class RWKVBlock(GradientCheckpointingLayer):
    """``x + att(ln1(x))``, then ``x + ffn(ln2(x))``, the layer's state in and out; the same for every version.

    A version's block names its mixes (``time_mix_class``, ``channel_mix_class``). The time mix is called as
    ``att(x, carry, shift, wkv_state, rows) -> (dx, carry, shift, wkv_state)``, ``carry`` being what one layer
    hands the next (RWKV-7: the first layer's v; others pass it through), the channel mix as
    ``ffn(x, shift, rows, tokens) -> (dx, shift)``.
    """
    time_mix_class: type = nn.Module
    channel_mix_class: type = nn.Module

    def __init__(self, config, layer_idx: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = self.time_mix_class(config, layer_idx)
        self.ffn = self.channel_mix_class(config, layer_idx)

    def forward(self, x, carry, state: Optional[LayerState] = None, rows: Optional[Rows] = None, tokens=None):
        att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
        dx, carry, att_shift, wkv_state = self.att(self.ln1(x), carry, att_shift, wkv_state, rows)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift, rows, tokens)
        x = x + dx
        return x, carry, (att_shift.float(), wkv_state, ffn_shift.float())


class LowRank(nn.Module):
    """``up(act(down(x)))``: the small low-rank maps of the time mix (w1/w2, a1/a2, v1/v2, g1/g2 in .pth)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)   # weight [rank, C] = (.pth x1).T
        self.up = nn.Linear(rank, dim, bias=False)     # weight [C, rank] = (.pth x2).T

    def forward(self, x, act=None):
        h = self.down(x)
        return self.up(act(h) if act is not None else h)


@dataclass
class RWKVOutput(ModelOutput):
    last_hidden_state: Optional[torch.FloatTensor] = None
    state: Optional[List[LayerState]] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclass
class RWKVCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    state: Optional[List[LayerState]] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


@torch.no_grad()
def init_shared_weights(module: nn.Module, cfg) -> None:
    """Random init of the parts every version shares: embeddings, layer norms, the head."""
    if isinstance(module, nn.Embedding):
        init.uniform_(module.weight, -1e-4, 1e-4)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.weight.shape[0] == cfg.vocab_size:
        scale = 0.5 * math.sqrt(cfg.vocab_size / cfg.hidden_size) if cfg.vocab_size > cfg.hidden_size else 0.5
        init.orthogonal_(module.weight, gain=scale)


class RWKVModelMixin:
    """The stack of blocks every RWKV version shares: embeddings -> ln0 -> blocks (state in, state out) -> ln_out.

    A version's model defines ``emb``, ``ln0``, ``blocks`` (``RWKVBlock``s) and ``ln_out``; each block is called
    as ``block(x, carry, layer_state, rows, tokens) -> (x, carry, new_layer_state)``. A time mix gives its
    initial WKV state in the op's layout: ``initial_wkv()`` (the learned one, or None) and ``blank_wkv()``
    (the state an empty sequence has).
    """

    def _block_tokens(self, input_ids, x0):
        """What blocks get as ``tokens=`` besides the hidden state (None: nothing; RWKV-7 DeepEmbed uses it)."""
        return None

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def init_state(self, batch_size: int, device=None) -> List[LayerState]:
        """The state a sequence starts from: zeros, or the learned initial states where there are some."""
        device = device or self.emb.weight.device
        state = []
        for block in self.blocks:
            att, ffn = block.att, block.ffn
            shifts = [(m.shift_state.detach().float().to(device).expand(batch_size, -1).clone()
                       if getattr(m, "shift_state", None) is not None else
                       torch.zeros(batch_size, self.config.hidden_size, device=device)) for m in (att, ffn)]
            wkv = att.initial_wkv()
            wkv = (att.blank_wkv() if wkv is None else wkv.detach()).float().to(device)
            state.append((shifts[0], wkv.expand(batch_size, *wkv.shape).clone(), shifts[1]))
        return state

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, state=None, use_cache=None,
                output_hidden_states=None, return_dict=None, position_ids=None, cu_seqlens=None, **kwargs):
        """``position_ids`` restarting at 0 (or ``cu_seqlens``) mark where packed samples start: each starts from
        the initial state (``models/rows.py``). Other position ids (e.g. ``arange``) change nothing else."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is None:
            inputs_embeds = self.emb(input_ids)
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers; the model has {len(self.blocks)}")
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask
        B, T = inputs_embeds.shape[:2]
        cu_seqlens = cu_seqlens if cu_seqlens is not None else kwargs.get("cu_seq_lens_q")
        rows = Rows.of(mask, sample_starts(B, T, position_ids, cu_seqlens, inputs_embeds.device))

        x = self.ln0(inputs_embeds)                                                  # [B, T, C]
        carry = torch.empty_like(x)  # what a block hands the next one (RWKV-7: the first layer's v)
        tokens = self._block_tokens(input_ids, x)
        all_hidden = (x,) if output_hidden_states else None
        new_state = []
        for i, block in enumerate(self.blocks):
            x, carry, layer_state = block(x, carry, state=None if state is None else state[i], rows=rows, tokens=tokens)
            new_state.append(layer_state)
            if output_hidden_states and i < len(self.blocks) - 1:
                all_hidden += (x,)
        x = self.ln_out(x)
        if output_hidden_states:
            all_hidden += (x,)
        out_state = new_state if (use_cache or state is not None) else None
        if not return_dict:
            return tuple(t for t in (x, out_state, all_hidden) if t is not None)
        return RWKVOutput(last_hidden_state=x, state=out_state, hidden_states=all_hidden)


class RWKVGenerationMixin(StateGenerationMixin):
    """The language-model head of every RWKV version: ``self.model`` (returns ``RWKVOutput``) + ``self.head``;
    generation with the state as the cache comes from ``StateGenerationMixin`` (models/generation.py).

    List it *first* in a model's bases (``class X(RWKVGenerationMixin, XPreTrainedModel)``) so its ``forward``
    comes before ``nn.Module``'s; transformers' ``can_generate`` looks for "GenerationMixin" in the bases' names.
    """

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, new_embeddings):
        self.head = new_embeddings

    def init_state(self, batch_size: int, device=None) -> List[LayerState]:
        return self.model.init_state(batch_size, device)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, state=None, labels=None,
                use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                return_logits: bool = True, loss_chunk_size: Optional[int] = None, position_ids=None,
                cu_seqlens=None, **kwargs):
        """``labels`` are shifted inside (``labels = input_ids`` works; -100 is ignored); ``shift_labels``
        (transformers' name) gives the targets already aligned with the positions, e.g. for a chunk of a row.
        ``position_ids`` restarting at 0 (or ``cu_seqlens``) mark packed samples, each run from the initial state.

        ``return_logits=False`` with labels computes the loss ``loss_chunk_size`` positions at a time (default:
        a 64 MiB chunk of logits; see ``models/loss.py``), so the ``[B, T, V]`` logits (V = 65536) never exist
        at once; ``logits`` is then None. Training and evaluation use this.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         state=state, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         return_dict=True, position_ids=position_ids,
                         cu_seqlens=cu_seqlens if cu_seqlens is not None else kwargs.get("cu_seq_lens_q"))
        hidden = out.last_hidden_state
        shift_labels = kwargs.get("shift_labels")
        if (labels is not None or shift_labels is not None) and not return_logits:
            loss = chunked_causal_lm_loss(hidden, self.head, labels, loss_chunk_size,
                                          kwargs.get("num_items_in_batch"), shift_labels)
            if not return_dict:
                return tuple(t for t in (loss, out.state, out.hidden_states) if t is not None)
            return RWKVCausalLMOutput(loss=loss, logits=None, state=out.state, hidden_states=out.hidden_states)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.head(hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            rest = tuple(t for t in (logits, out.state, out.hidden_states) if t is not None)
            return ((loss,) + rest) if loss is not None else rest
        return RWKVCausalLMOutput(loss=loss, logits=logits, state=out.state, hidden_states=out.hidden_states)
