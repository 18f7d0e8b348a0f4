"""Sampling as RWKV users know it (the official ``rwkv`` package's ``PIPELINE`` and ChatRWKV), built from
transformers ``LogitsProcessor``s so that ``generate()`` and ``chat`` sample the same way.

The order is the official one: the presence / frequency penalties on the raw logits, then top-p and top-k on the
untempered probabilities, then the temperature (``rwkv.utils.PIPELINE.sample_logits`` cuts the nucleus before it
applies the temperature). Temperature 0 means greedy decoding; the penalties still apply to it.

Penalties (:class:`RWKVPenaltyLogitsProcessor`) count only the generated tokens (not the prompt): every token
generated so far adds 1 to its count, every count is multiplied by ``decay`` at each step, and a token's logit
drops by ``presence + frequency * count`` once it has been generated. Tokens whose text is only spaces, tabs or
digits count 0 but still get the presence penalty, as in the official package.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

# the official package counts a generated token with weight 0 when its text is part of this string
_UNCOUNTED_TEXT = " \t0123456789"


class RWKVPenaltyLogitsProcessor(LogitsProcessor):
    """Presence and frequency penalties over the generated tokens, the counts decaying each step (RWKV style).

    ``prompt_length``: the columns of ``input_ids`` before it are the prompt (left padding included) and are not
    counted; 0 when ``input_ids`` holds only generated tokens. ``uncounted_ids``: tokens that count 0 (see
    :func:`uncounted_token_ids`). Stateless: the counts are recomputed from ``input_ids`` at each call, so one
    processor serves any number of ``generate()`` calls and the rows of a batch independently.
    """

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, decay: float = 0.996,
                 prompt_length: int = 0, uncounted_ids: Iterable[int] = ()):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"the penalty decay should be within [0, 1], got {decay}")
        if prompt_length < 0:
            raise ValueError(f"prompt_length should be >= 0, got {prompt_length}")
        self.presence, self.frequency, self.decay = float(presence), float(frequency), float(decay)
        self.prompt_length = int(prompt_length)
        self.uncounted_ids = sorted({int(i) for i in uncounted_ids})

    @property
    def active(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0

    def counts(self, input_ids: torch.LongTensor, vocab_size: int):
        """(seen [B, V] bool, decayed counts [B, V] fp32) of the generated tokens in ``input_ids``."""
        gen = input_ids[:, self.prompt_length:]
        B, n = gen.shape
        seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=input_ids.device)
        counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=input_ids.device)
        if n == 0:
            return seen, counts
        gen = gen.clamp(0, vocab_size - 1)
        seen.scatter_(1, gen, True)
        # the newest token weighs decay**0, the one before decay**1, ... (the official loop decays, then adds)
        weights = self.decay ** torch.arange(n - 1, -1, -1, device=input_ids.device, dtype=torch.float64)
        weights = weights.to(torch.float32).expand(B, n).clone()
        if self.uncounted_ids:
            uncounted = torch.tensor(self.uncounted_ids, device=input_ids.device)
            weights[torch.isin(gen, uncounted)] = 0.0
        counts.scatter_add_(1, gen, weights)
        return seen, counts

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.active:
            return scores
        seen, counts = self.counts(input_ids, scores.shape[-1])
        penalty = (self.presence + self.frequency * counts) * seen
        return scores - penalty.to(scores.dtype)


def uncounted_token_ids(tokenizer) -> List[int]:
    """The tokens whose text is a piece of ``' \\t0123456789'`` (a space, a tab, digits): the official package
    counts them with weight 0 in the frequency penalty. Found by encoding each such piece."""
    ids = set()
    for i in range(len(_UNCOUNTED_TEXT)):
        for j in range(i + 1, len(_UNCOUNTED_TEXT) + 1):
            try:
                enc = tokenizer(_UNCOUNTED_TEXT[i:j], add_special_tokens=False).input_ids
            except Exception:  # noqa: BLE001 - a tokenizer that refuses a piece: nothing to exempt for it
                continue
            if len(enc) == 1 and tokenizer.decode(enc) == _UNCOUNTED_TEXT[i:j]:
                ids.add(int(enc[0]))
    return sorted(ids)


def logits_processors(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
                      frequency_penalty: float = 0.0, penalty_decay: float = 0.996, prompt_length: int = 0,
                      uncounted_ids: Iterable[int] = ()) -> LogitsProcessorList:
    """The processors for one generation, in the official order (penalties, top-p, top-k, temperature).

    With ``temperature`` 0 (greedy) only the penalties are in the list. Pass it to ``generate(logits_processor=...)``
    with ``do_sample=temperature > 0`` and no temperature / top_p / top_k of transformers' own (see
    :func:`generate_kwargs`), or to :func:`next_token`.
    """
    check_settings(temperature=temperature, top_p=top_p, top_k=top_k, penalty_decay=penalty_decay)
    procs = LogitsProcessorList()
    if presence_penalty or frequency_penalty:
        procs.append(RWKVPenaltyLogitsProcessor(presence_penalty, frequency_penalty, penalty_decay, prompt_length,
                                                uncounted_ids))
    if temperature > 0:
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=max(top_p, 0.0), min_tokens_to_keep=1))
        if top_k > 0:
            procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
    return procs


def generate_kwargs(processors: LogitsProcessorList, temperature: float) -> dict:
    """``generate()`` arguments that sample with ``processors`` alone (transformers adds no warper of its own)."""
    if temperature <= 0:
        return dict(logits_processor=processors, do_sample=False)
    return dict(logits_processor=processors, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)


def check_settings(temperature=None, top_p=None, top_k=None, penalty_decay=None, max_new_tokens=None) -> None:
    """ValueError naming the first setting out of its range."""
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature should be >= 0 (0: greedy), got {temperature}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p should be within [0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k should be >= 0 (0: off), got {top_k}")
    if penalty_decay is not None and not 0.0 <= penalty_decay <= 1.0:
        raise ValueError(f"penalty_decay should be within [0, 1], got {penalty_decay}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens should be >= 1, got {max_new_tokens}")


def next_token(processors: LogitsProcessorList, generated: List[int], logits: torch.Tensor, temperature: float,
               generator: Optional[torch.Generator] = None) -> int:
    """One token from one row of logits after ``processors`` (``generated``: the tokens generated so far, the
    processors' ``input_ids``); greedy when ``temperature`` is 0."""
    ids = torch.tensor([generated], dtype=torch.long, device=logits.device)
    scores = processors(ids, logits.float().reshape(1, -1))
    if temperature <= 0:
        return int(torch.argmax(scores[0]))
    probs = torch.softmax(scores[0], dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
