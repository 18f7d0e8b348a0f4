"""Dataset rows -> text segments -> token ids and labels (the loss mask).

Formats (``data.format``; column names from ``data.fields``):

- ``text``: ``{"text": "..."}``; the loss is on every token.
- ``instruction``: ``{"instruction", "input" (optional), "output"}`` rendered as
  ``Instruction: ...\\n\\nInput: ...\\n\\nResponse: ...\\n\\n``; the loss is on the response.
- ``chat``: ``{"messages": [{"role": "user"|"assistant"|"system"|"tool", "content": "..."}, ...]}`` (ShareGPT's
  ``human``/``gpt`` roles work too), rendered by the chat template ``data.template.name`` (``rwkv``:
  ``User: ...\\n\\nAssistant: ...\\n\\n``; ``g1``: the RWKV-7 G1 think format); loss on assistant turns. An
  assistant message may carry ``tool_calls`` and, for ``g1``, ``reasoning_content`` / ``reasoning`` / ``thinking``
  (or an inline ``<think>...</think>``); a row may carry ``tools`` (a list of JSON schemas, or its JSON text).
- ``persona``: a chat plus ``{"persona": "..."}`` (or ``data.persona`` for every row), written as a
  ``System:`` turn first when ``data.persona_in_prompt`` is true. With state tuning, set it false: the state
  learns the persona, and the prompt at chat time carries none.

The chat templates are the tokenizer's (``rwkv_peft/tokenization/chat_templates.py``): the recipe renders a chat
through the same Jinja source that ``tokenizer.apply_chat_template`` uses, so the two cannot differ.

``data.loss_on: all`` trains on every token instead. Each sample ends with the end-of-text token (id 0) when
``data.add_eos`` is true; it is trained where the sample's last segment is.

A segment is tokenized on its own and the ids are concatenated, so a mask boundary never falls inside a
token. A malformed row gives an error that names the row; ``data.on_bad_row`` chooses skip or fail.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from ..errors import RWKVPeftError
from . import DataError
from .packing import IGNORE

Segment = Tuple[str, bool]  # (text, trained)

ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatbot": "assistant",
    "system": "system",
}
# Roles of tool results (a chat row's ``tool`` messages); kept out of ROLE_ALIASES, which `chat` also reads.
TOOL_ROLES = ("tool", "function", "observation", "ipython")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class RowError(RWKVPeftError, ValueError):
    """What is wrong with one row (the caller adds the row number)."""


def _text(row: dict, key: str, what: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field '{key}' ({what}); the row has: {', '.join(sorted(map(str, row))) or 'nothing'}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' ({what}) should be text, found {type(value).__name__} {str(value)[:40]!r}")
    if required and not value.strip():
        raise RowError(f"field '{key}' ({what}) is empty")
    return value


def _clean(text: str, cfg) -> str:
    text = text.strip()
    if cfg.template.collapse_blank_lines:
        text = re.sub(r"\n\s*\n", "\n", text)
    return text


def _turn(name: str, content: str, trained: bool, cfg) -> List[Segment]:
    """``{name}{sep}{content}{turn_sep}``; a trained turn is split after the name and the separator's head.

    Used by the instruction format; chat and persona rows go through the chat templates, which write turns the
    same way (tests/data/test_formats.py holds the two to each other)."""
    t = cfg.template
    head = t.role_separator.rstrip()
    tail = t.role_separator[len(head):]
    body = tail + _clean(content, cfg) + t.turn_separator
    return [(name + head, False), (body, trained)]


def _json_field(value: Any, what: str) -> Any:
    """A field given as JSON text (as arrow-typed datasets often store nested data) read as data."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"{what} is text that is not JSON") from None
    return value


def _tool_calls(calls: Any, j: int) -> List[dict]:
    calls = _json_field(calls, f"message {j + 1}: 'tool_calls'")
    shape = "a list of {'function': {'name': ..., 'arguments': {...}}} (or {'name', 'arguments'})"
    if not isinstance(calls, list):
        raise RowError(f"message {j + 1}: 'tool_calls' should be {shape}, found {type(calls).__name__}")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"message {j + 1}: tool call {k + 1} has no name; 'tool_calls' should be {shape}")
    return calls


def _messages(row: dict, cfg) -> List[Dict[str, Any]]:
    """The row's messages as template messages ``{"role", "content", ...}`` (roles canonical, extras kept)."""
    f = cfg.fields
    if f.messages not in row or row[f.messages] is None:
        raise RowError(f"missing field '{f.messages}' (the list of messages); the row has: "
                       f"{', '.join(sorted(map(str, row))) or 'nothing'}")
    msgs = row[f.messages]
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise RowError(f"field '{f.messages}' is text that is not a JSON list of messages") from None
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"field '{f.messages}' should be a non-empty list of messages, found "
                       f"{type(msgs).__name__}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"message {j + 1} should be a mapping with '{f.role}' and '{f.content}', found "
                           f"{type(m).__name__}")
        role = m.get(f.role)
        key = role.strip().lower() if isinstance(role, str) else None
        if key not in ROLE_ALIASES and key not in TOOL_ROLES:
            raise RowError(f"message {j + 1}: role {role!r} is not one of user/human, assistant/gpt/bot, system, tool"
                           + (f" (field '{f.role}')" if f.role not in m else ""))
        message: Dict[str, Any] = {"role": ROLE_ALIASES.get(key, "tool")}
        calls = m.get("tool_calls") if message["role"] == "assistant" else None
        if calls is not None:
            calls = _tool_calls(calls, j)
        content = m.get(f.content)
        if content is None and calls:
            content = ""  # a message that only calls tools
        if not isinstance(content, str):
            raise RowError(f"message {j + 1}: '{f.content}' should be text, found {type(content).__name__}")
        message["content"] = content
        if message["role"] == "assistant":
            for k in REASONING_KEYS:
                if m.get(k) is not None:
                    if not isinstance(m[k], str):
                        raise RowError(f"message {j + 1}: '{k}' should be text, found {type(m[k]).__name__}")
                    message[k] = m[k]
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _tools(row: dict) -> Optional[List[dict]]:
    """The row's ``tools`` (JSON schemas of the functions it may call), if it has any."""
    tools = row.get("tools")
    if tools is None:
        return None
    tools = _json_field(tools, "field 'tools'")
    if not isinstance(tools, list) or not all(isinstance(x, dict) for x in tools):
        raise RowError(f"field 'tools' should be a list of JSON schemas (mappings), found {type(tools).__name__}")
    return tools or None


def _chat_segments(messages: List[Dict[str, Any]], tools: Optional[List[dict]], cfg) -> List[Segment]:
    """A chat rendered by the recipe's chat template (the tokenizer's Jinja source), cut into segments."""
    from jinja2.exceptions import TemplateError

    from ..tokenization.chat_templates import render_segments as render_chat

    t = cfg.template
    try:
        return render_chat(messages, t.name, tools=tools, system_name=t.roles.system, user_name=t.roles.user,
                           assistant_name=t.roles.assistant, role_separator=t.role_separator,
                           turn_separator=t.turn_separator, collapse_blank_lines=t.collapse_blank_lines,
                           train_think=t.train_think)
    except (TemplateError, ValueError, TypeError) as e:  # what the row holds cannot be rendered
        raise RowError(f"the chat template {t.name!r} cannot render this row: {e}") from None


def render_segments(row: dict, cfg) -> List[Segment]:
    """One row as ``[(text, trained), ...]`` following ``cfg`` (the recipe's data section)."""
    segs = _render(row, cfg)
    return [(t, True) for t, _ in segs] if cfg.loss_on == "all" else segs


def _render(row: dict, cfg) -> List[Segment]:
    fmt, f, t = cfg.format, cfg.fields, cfg.template
    all_tokens = cfg.loss_on == "all"
    if fmt == "text":
        return [(_text(row, f.text, "the text"), True)]
    if fmt == "instruction":
        inst = _text(row, f.instruction, "the instruction")
        inp = _text(row, f.input, "the input", required=False)
        out = _text(row, f.output, "the response")
        segs = _turn(t.instruction.instruction, inst, all_tokens, cfg)
        if inp.strip():
            segs += _turn(t.instruction.input, inp, all_tokens, cfg)
        segs += _turn(t.instruction.response, out, True, cfg)
        return segs
    if fmt in ("chat", "persona"):
        msgs = _messages(row, cfg)
        if fmt == "persona" and cfg.persona_in_prompt:
            persona = row.get(f.persona) if row.get(f.persona) is not None else cfg.persona
            if persona is None:
                raise RowError(f"missing field '{f.persona}' (the persona) and no data.persona default")
            if not isinstance(persona, str):
                raise RowError(f"field '{f.persona}' should be text, found {type(persona).__name__}")
            msgs = [{"role": "system", "content": persona}] + msgs
        segs = _chat_segments(msgs, _tools(row), cfg)
        if all_tokens:
            segs = [(txt, True) for txt, _ in segs]
        if not any(tr and txt.strip() for txt, tr in segs):
            raise RowError("no assistant message to train on (set data.loss_on: all to train on every turn)")
        return segs
    raise DataError(f"unknown data.format {fmt!r}")


def tokenize_row(row: dict, cfg, tokenizer, eos_id: int = 0) -> Dict[str, Any]:
    """Token ids and labels of one row (raises RowError for a malformed row)."""
    if "_json" in row:  # rows read line by line from a JSON file that arrow could not type
        try:
            row = json.loads(row["_json"])
        except json.JSONDecodeError as e:
            raise RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise RowError(f"expected a JSON object, found {type(row).__name__}")
    ids: List[int] = []
    labels: List[int] = []
    for text, trained in render_segments(row, cfg):
        piece = list(tokenizer.encode(text, add_special_tokens=False))
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if cfg.add_eos:
        ids.append(eos_id)
        labels.append(eos_id if (labels and labels[-1] != IGNORE) else IGNORE)
    return {"input_ids": ids, "labels": labels}


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable identity of a tokenizer for the datasets cache."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    try:
        vocab = tokenizer.get_vocab()
        h.update(str(len(vocab)).encode())
        for k, v in sorted(vocab.items(), key=lambda kv: kv[1])[:: max(1, len(vocab) // 4096)]:
            h.update(f"{k!r}{v}".encode())
    except Exception:  # noqa: BLE001 - any tokenizer works; it just caches by name
        pass
    h.update(repr(tokenizer.encode("Hello world!\n\nUser: x", add_special_tokens=False)).encode())
    return h.hexdigest()[:16]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return 0 if eos is None else int(eos)


def tokenize_dataset(ds, cfg, tokenizer, source: str = "train data", num_proc: Optional[int] = None,
                     log=print):
    """Tokenize a ``datasets.Dataset`` (cached by datasets, parallel with ``num_proc``).

    Returns a dataset with ``input_ids`` and ``labels`` only. Malformed rows are reported with their row number
    (1-based) and dropped (``on_bad_row: skip``) or raise :class:`DataError` (``fail``).
    """
    from datasets import Dataset

    if not isinstance(ds, Dataset):
        raise DataError(f"{source}: expected a datasets.Dataset, found {type(ds).__name__}")
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    eos = _eos_id(tokenizer)
    max_len = cfg.max_length
    parts = {"cfg": cfg.model_dump(mode="json", exclude={"train", "eval", "num_proc", "cache_dir", "on_bad_row",
                                                          "split", "eval_split"}),
             "tok": tokenizer_fingerprint(tokenizer), "eos": eos, "v": 1}
    if cfg.format in ("chat", "persona"):  # a changed template source re-tokenizes
        from ..tokenization.chat_templates import template_fingerprint
        parts["template"] = template_fingerprint(cfg.template.name)
    spec = json.dumps(parts, sort_keys=True)
    fingerprint = hashlib.sha256((ds._fingerprint + spec).encode()).hexdigest()[:32]

    def fn(row, idx):
        idx = int(row["_line"]) - 1 if "_line" in row else idx
        try:
            out = tokenize_row(row, cfg, tokenizer, eos)
        except RowError as e:
            return {"input_ids": [], "labels": [], "_error": str(e), "_row": idx + 1, "_truncated": False}
        ids, labels = out["input_ids"], out["labels"]
        truncated = len(ids) > max_len
        return {"input_ids": ids[:max_len], "labels": labels[:max_len], "_error": "", "_row": idx + 1,
                "_truncated": truncated}

    nproc = max(1, min(num_proc or cfg.num_proc, len(ds) // 2 or 1))
    out = ds.map(fn, with_indices=True, remove_columns=ds.column_names, num_proc=nproc if nproc > 1 else None,
                 new_fingerprint=fingerprint, desc=f"tokenizing {source}")
    errors = out.filter(lambda e: bool(e), input_columns=["_error"],
                        new_fingerprint=fingerprint + "e") if any(out["_error"]) else None
    if errors is not None and len(errors):
        unit = "line" if "_line" in ds.column_names else "row"
        first = [f"{source} {unit} {r}: {e}" for r, e in zip(errors["_row"][:5], errors["_error"][:5])]
        if cfg.on_bad_row == "fail":
            more = f" (and {len(errors) - 1} more malformed rows)" if len(errors) > 1 else ""
            raise DataError(first[0] + more + "; set data.on_bad_row: skip to leave such rows out")
        log(f"skipping {len(errors)} malformed row(s) of {len(ds)} in {source}:\n  " + "\n  ".join(first)
            + ("\n  ..." if len(errors) > 5 else ""))
    n_trunc = sum(out["_truncated"])
    if n_trunc:
        log(f"{n_trunc} sample(s) of {source} are longer than data.max_length={max_len} tokens and were cut")
    keep = out.filter(lambda e, lab: not e and any(x != IGNORE for x in lab), input_columns=["_error", "labels"],
                      new_fingerprint=fingerprint + "k")
    dropped = len(out) - len(keep) - (len(errors) if errors is not None else 0)
    if dropped:
        log(f"{dropped} sample(s) of {source} have no trained token left after cutting to max_length; left out")
    if len(keep) == 0:
        raise DataError(f"{source}: no usable rows left (of {len(ds)})")
    return keep.remove_columns(["_error", "_row", "_truncated"])
