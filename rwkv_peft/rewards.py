"""Simple reward functions for GRPO (``train.objective: grpo``), named in a recipe as ``rwkv_peft.rewards:NAME``.

A reward function is what TRL's ``GRPOTrainer`` calls: ``fn(prompts=[...], completions=[...], **columns)``, where
``completions`` are the generated answers (text) and ``columns`` hold every other column of the prompt rows, one
value per completion (a row's values repeat for each of its ``grpo.num_generations`` answers). It returns one
float per completion (``None`` for "no opinion"). Your own live in any module:
``grpo.reward_funcs: ["my_rewards:politeness"]`` (imported with the current folder on the path) or
``["path/to/rewards.py:politeness"]``. Rewards are compared within each prompt's group of answers, so only their
differences matter; several functions are summed (``grpo.reward_weights`` weighs them).

The ones here suit the RWKV chat format (``User: ...\\n\\nAssistant: ...\\n\\n``), where a blank line ends a turn.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

TURN_END = "\n\n"
ROLE_LINE = re.compile(r"(^|\n)\s*(User|Assistant|System)\s*:", re.IGNORECASE)


def _answer(completion) -> str:
    """The answer text: a completion is text (or, from conversational prompts, a list of messages)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def ends_turn(completions: Sequence, **_) -> List[float]:
    """1.0 for an answer that ends its turn (a blank line, the end of text) before writing another role's
    line, 0.0 for one that runs on into ``User:`` / ``Assistant:`` or is cut off at the length limit."""
    out = []
    for c in completions:
        text = _answer(c)
        head, sep, _ = text.partition(TURN_END)
        out.append(1.0 if sep and head.strip() and not ROLE_LINE.search(head) else 0.0)
    return out


def concise(completions: Sequence, target_chars: int = 200, **_) -> List[float]:
    """Shorter answers score higher: 1.0 up to ``target_chars`` characters in the first turn, then falling
    linearly to 0.0 at twice that (an empty answer scores 0.0)."""
    out = []
    for c in completions:
        n = len(_answer(c).split(TURN_END)[0].strip())
        out.append(0.0 if n == 0 else max(0.0, min(1.0, 2.0 - n / target_chars)))
    return out


def contains_answer(completions: Sequence, answer: Optional[Sequence] = None, **_) -> List[Optional[float]]:
    """1.0 when the first turn of the answer contains the row's ``answer`` column (case-insensitive), else 0.0;
    ``None`` for rows without one (the reward abstains). For short factual or arithmetic answers."""
    if answer is None:
        return [None] * len(completions)
    out = []
    for c, want in zip(completions, answer):
        if want is None or str(want).strip() == "":
            out.append(None)
            continue
        out.append(1.0 if str(want).strip().lower() in _answer(c).split(TURN_END)[0].lower() else 0.0)
    return out


__all__ = ["ends_turn", "concise", "contains_answer"]
