"""``generate()`` with the RNN state as its cache, carried from step to step by code of ours.

transformers keeps renaming how a cache travels between generation steps (``past_key_values``, ``state``,
``cache_params``, ``cache``; 5.24 stopped handing ``state`` back, which silently re-ran the whole prefix at every
step). So the state does not ride on any of those names. Each ``generate()`` call puts a fresh
:class:`GenerationState` of ours in its model kwargs (``rwkv_generation``), and two hooks keep it:

- ``prepare_inputs_for_generation`` feeds only the tokens the state has not read yet (the whole prompt first,
  then one token per step) and notes what it fed;
- ``_update_model_kwargs_for_generation`` stores the state the forward returned, with the tokens it has read.

The second is a private transformers method; if a release stops calling it, the next step raises
:class:`GenerationHookError` instead of quietly going quadratic. Beam search reorders the rows of ``input_ids``
between steps: the state's rows are matched to them by the tokens (and padding) each row has read, so no
transformers reorder hook is needed either. Tested on transformers 5.0, 5.17, 5.23 and 5.24.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from transformers import GenerationMixin

from ..errors import EXIT_FAILED, RWKVPeftError

logger = logging.getLogger(__name__)

LayerState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# names transformers has used for a cache in model kwargs; none of them may carry our state between steps
_UPSTREAM_CACHE_NAMES = ("past_key_values", "cache", "cache_params", "state", "mems", "past_buckets_states")
# forward arguments a generation step passes through unchanged
_PASS_THROUGH = ("logits_to_keep", "output_hidden_states")


class GenerationHookError(RWKVPeftError, RuntimeError):
    """transformers' generate() no longer calls the hook that hands the RNN state from one step to the next."""
    exit_code = EXIT_FAILED


@dataclass
class GenerationState:
    """The RNN state of one ``generate()`` call and what it has read.

    layers: the per-layer state after reading ``ids`` (None before the prompt is read);
    ids / mask: [B, n] the tokens read so far and their attention mask (mask None: all real);
    pending: the (ids, mask) of the step in flight, set by prepare and consumed by update;
    start: the state the caller passed to begin from (None: zeros or the learned initial state).
    """
    layers: Optional[List[LayerState]] = None
    start: Optional[List[LayerState]] = None
    ids: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    pending: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def rows_for(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """For each row of ``input_ids``, the state row that read the same prefix; None if some row has none.

        :data:`SAME_ROWS` (the state used as it is, no copy) unless beam search reordered the rows. Rows that
        read the same tokens with the same padding hold the same state, so any match is exact. The usual step
        compares the prefix once (a memcmp of the ids read so far: microseconds against the step's milliseconds).
        """
        n = self.ids.shape[1]
        if input_ids.shape[1] < n:
            return None
        ids = input_ids[:, :n]
        if ids.shape[0] == self.ids.shape[0] and torch.equal(ids, self.ids):
            if attention_mask is None and self.mask is None:
                return SAME_ROWS
            if (attention_mask is not None and self.mask is not None
                    and torch.equal(attention_mask[:, :n].to(self.mask.dtype), self.mask[:, :n])):
                return SAME_ROWS
        mask = _mask_prefix(attention_mask, n, input_ids)
        own_mask = _mask_prefix(self.mask, n, self.ids)
        if ids.shape[0] == self.ids.shape[0] and torch.equal(ids, self.ids) and torch.equal(mask, own_mask):
            return SAME_ROWS
        same = (ids[:, None] == self.ids[None]).all(-1) & (mask[:, None] == own_mask[None]).all(-1)  # [B, B_state]
        if not bool(same.any(-1).all()):
            return None
        return same.int().argmax(-1)


def _mask_prefix(mask: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like[:, :n]) if mask is None else mask[:, :n].to(like.dtype)


SAME_ROWS = slice(None)  # ``rows_for``: every row of input_ids is the same row of the state


def _select_rows(layers: List[LayerState], rows) -> List[LayerState]:
    if rows is SAME_ROWS:  # the common case: no copy (the state is replaced by the forward's, never read again)
        return layers
    return [tuple(s.index_select(0, rows.to(s.device)) for s in layer) for layer in layers]


def _batch_to(layers: Optional[List[LayerState]], batch: int) -> Optional[List[LayerState]]:
    """A caller's starting state, repeated per row when generate() expanded the batch (beams, several returns)."""
    if layers is None or layers[0][0].shape[0] == batch:
        return layers
    n = layers[0][0].shape[0]
    if batch % n:
        raise ValueError(f"the starting state has batch size {n}; the prompts have {batch}")
    return [tuple(s.repeat_interleave(batch // n, dim=0) for s in layer) for layer in layers]


class StateGenerationMixin(GenerationMixin):
    """generate() for RWKV: the state as the cache, read one new token per step (see the module docstring)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is our own; transformers must not build a KV cache for it

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; ``state=`` (a per-layer state, e.g. a persona) sets where it starts."""
        if kwargs.get("rwkv_generation") is not None:
            raise ValueError("rwkv_generation is set by generate() itself; pass a starting state as state=")
        if kwargs.get("inputs_embeds") is not None and kwargs.get("num_beams", 1) > 1:
            raise ValueError("beam search needs input_ids prompts: the state's rows are matched by their tokens")
        kwargs["rwkv_generation"] = GenerationState()
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, rwkv_generation: Optional[GenerationState] = None,
                                      state=None, attention_mask=None, inputs_embeds=None, use_cache=True,
                                      **kwargs):
        extra = {k: kwargs[k] for k in _PASS_THROUGH if k in kwargs}
        gen = rwkv_generation
        if gen is None or not use_cache:  # outside our generate(), or no cache asked for: read everything
            return self._read_all(input_ids, attention_mask, inputs_embeds, state, extra)
        if gen.pending is not None:
            raise GenerationHookError(
                "transformers did not hand the RNN state back after a generation step (its "
                "_update_model_kwargs_for_generation was not called); generation would re-read the whole text "
                "at every step. Install a transformers version rwkv-peft supports (see pyproject.toml).")
        if gen.layers is None:  # the first step: remember where the caller started
            gen.start = _batch_to(state, input_ids.shape[0])
        rows = gen.rows_for(input_ids, attention_mask) if gen.layers is not None else None
        gen.pending = (input_ids, attention_mask)
        if rows is not None:
            return {"input_ids": input_ids[:, gen.ids.shape[1]:], "state": _select_rows(gen.layers, rows),
                    "use_cache": True, **extra}
        if gen.layers is not None:  # something rewrote what was read (e.g. assisted decoding rejected tokens)
            if inputs_embeds is not None:
                raise ValueError("generate(): the rows no longer extend what the state has read, and a prompt "
                                 "given as inputs_embeds cannot be read again")
            logger.warning("generate(): the rows no longer extend what the state has read; reading them again")
        return self._read_all(input_ids, attention_mask, inputs_embeds, gen.start, extra)

    @staticmethod
    def _read_all(input_ids, attention_mask, inputs_embeds, state, extra):
        if inputs_embeds is not None and input_ids.shape[1] == 0:  # the prompt given as embeddings
            return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "state": state,
                    "use_cache": True, **extra}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "state": state, "use_cache": True,
                **extra}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        for name in _UPSTREAM_CACHE_NAMES:  # beam search would try to reorder them with hooks we don't use
            model_kwargs.pop(name, None)
        gen = model_kwargs.get("rwkv_generation")
        if gen is not None and gen.pending is not None:
            gen.ids, gen.mask = gen.pending
            gen.layers, gen.pending = outputs.state, None
        return model_kwargs
