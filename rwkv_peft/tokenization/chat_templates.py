"""Chat templates for RWKV models, as transformers chat templates (Jinja, ``tokenizer.apply_chat_template``).

This module is the one definition of the chat formats: the tokenizer carries these templates (saved and loaded with
it), and the recipe's ``chat`` / ``persona`` data formats render rows through them (``rwkv_peft/data/formats.py``).
See docs/tokenizer.md ("Chat templates") for the text each produces.

Named templates (``tokenizer.apply_chat_template(messages, chat_template="g1")``):

* ``rwkv`` (also ``default``): the RWKV World format, ``System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\n``.
  ``add_generation_prompt=True`` ends the text with ``Assistant:`` (no trailing space: the model generates the
  space, and the trained part of an assistant turn starts with it).
* ``g1``: the RWKV-7 "G1" reasoning format. Every assistant turn carries a think block,
  ``Assistant: <think>\\nREASONING\\n</think>\\nANSWER\\n\\n`` (``<think>\\n</think>`` when there is no reasoning).
  Reasoning comes from a message's ``reasoning_content`` / ``reasoning`` / ``thinking`` field or from an inline
  ``<think>...</think>`` at the start of its content. The generation prompt is ``Assistant: <think`` (the model
  thinks; the official G1 think prompt) or, with ``enable_thinking=False``, ``Assistant: <think>\\n</think>`` (the
  "fake think" prompt: an empty think block, the model answers at once). ``train_think=False`` keeps the think
  block out of the assistant mask (only ``\\nANSWER\\n\\n`` is trained).

Both templates take, as template keyword arguments (``apply_chat_template(..., user_name="Q")`` or a recipe's
``data.template``): ``system_name`` / ``user_name`` / ``assistant_name`` (``System`` / ``User`` / ``Assistant``),
``role_separator`` (``": "``), ``turn_separator`` (``"\\n\\n"``) and ``collapse_blank_lines`` (true: a blank line
inside a message becomes one newline, since a blank line ends a turn in this format; text is always stripped).

Tools follow the function-call examples of the official G1 templates (BlinkDL/RWKV-LM,
``RWKV-v7/RWKV7-G1x-templates.txt``):

* ``tools=[...]`` (JSON schemas, as transformers takes them) become a system turn
  ``System: Tools:\\n[\\n{"name":...,"description":...,"arguments":{...}},\\n...\\n]\\nReturn only a JSON function
  call.`` (appended, after a newline, to the first message when that is a system message);
* an assistant message's ``tool_calls`` are written after its content as
  ``\\`\\`\\`json\\n{"name":"f","arguments":{...}}\\n\\`\\`\\``` (one call a line);
* a ``tool`` message is a user turn ``User: Function output:\\nCONTENT``.

Assistant masks: the trained part of each assistant turn is inside ``{% generation %}...{% endgeneration %}``,
so ``apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`` works (on our slow
tokenizer too: :class:`~rwkv_peft.tokenization.RWKVWorldTokenizer` overrides it, see :func:`render_segments`).

Segments: the templates also write a *segment mark* (the template variable ``segment_mark``; empty unless a caller
sets it) at every place where the text is cut into separately tokenized pieces: before each turn, after each
role name (``User:`` | `` hello\\n\\n``) and after a think block. :func:`render_segments` renders with a mark, cuts
there and at the edges of the generation blocks, and returns ``[(text, trained), ...]``; tokenizing each piece on
its own means a mask boundary never falls inside a token, and ids are the same whatever is trained.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "RWKV_TEMPLATE",
    "G1_TEMPLATE",
    "default_chat_templates",
    "template_source",
    "template_fingerprint",
    "render_segments",
    "has_generation_blocks",
]

Segment = Tuple[str, bool]  # (text, trained)

# ---------------------------------------------------------------------------------------------------------------
# The template source. Two named templates share one body; only the first line differs. Every piece of output is
# written by an expression ({{- ... -}}), never as literal text between tags, so the whitespace of this source does
# not leak into the rendered text (transformers compiles with trim_blocks and lstrip_blocks; the "-" markers strip
# the rest).
# ---------------------------------------------------------------------------------------------------------------

_BODY = r"""
{#- Settings (template keyword arguments, with the RWKV defaults) -#}
{%- set mark = segment_mark if segment_mark is defined and segment_mark else '' -%}
{%- set sep = role_separator if role_separator is defined and role_separator is not none else ': ' -%}
{%- set head = sep.rstrip() -%}
{%- set tail = sep[head | length:] -%}
{%- set turn_end = turn_separator if turn_separator is defined and turn_separator is not none else '\n\n' -%}
{%- set collapse = true if collapse_blank_lines is not defined or collapse_blank_lines is none
    else collapse_blank_lines -%}
{%- set names = {
    'system': system_name if system_name is defined and system_name is not none else 'System',
    'user': user_name if user_name is defined and user_name is not none else 'User',
    'assistant': assistant_name if assistant_name is defined and assistant_name is not none else 'Assistant'} -%}
{%- set train_think_part = train_think is not defined or train_think is none or train_think -%}
{%- set think_at_start = enable_thinking is not defined or enable_thinking is none or enable_thinking -%}

{#- The text of a message's content: a string, or the text parts of a list of content blocks -#}
{%- macro text_of(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is mapping -%}
    {{- content.text if content.text is defined and content.text is string else '' -}}
  {%- elif content is iterable -%}
    {%- for part in content -%}
      {%- if part is string -%}
        {{- part -}}
      {%- elif part is mapping and part.text is defined and part.text is string -%}
        {{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- elif content is not none -%}
    {{- content -}}
  {%- endif -%}
{%- endmacro -%}

{#- Strip; with collapse, drop blank lines (the same as re.sub(r"\n\s*\n", "\n", text.strip())) -#}
{%- macro clean(text, collapse) -%}
  {%- if collapse -%}
    {%- for line in (text | trim).split('\n') if line | trim -%}
      {{- ('\n' if not loop.first else '') ~ line -}}
    {%- endfor -%}
  {%- else -%}
    {{- text | trim -}}
  {%- endif -%}
{%- endmacro -%}

{#- One tool schema as a compact JSON object {"name", "description", "arguments"[, "required"]} -#}
{%- macro tool_json(tool) -%}
  {%- set fn = tool.function if tool.function is defined and tool.function is mapping else tool -%}
  {%- if fn.parameters is defined and fn.parameters is mapping -%}
    {%- set args = fn.parameters.properties if fn.parameters.properties is defined else fn.parameters -%}
    {%- set required = fn.parameters.required if fn.parameters.required is defined else none -%}
  {%- else -%}
    {%- set args = fn.arguments if fn.arguments is defined and fn.arguments is not none else {} -%}
    {%- set required = fn.required if fn.required is defined else none -%}
  {%- endif -%}
  {{- '{"name":' ~ (fn.name | tojson) -}}
  {%- if fn.description is defined and fn.description -%}
    {{- ',"description":' ~ (fn.description | tojson) -}}
  {%- endif -%}
  {{- ',"arguments":' ~ (args | tojson(separators=(',', ':'))) -}}
  {%- if required -%}
    {{- ',"required":' ~ (required | tojson(separators=(',', ':'))) -}}
  {%- endif -%}
  {{- '}' -}}
{%- endmacro -%}

{#- One tool call as {"name":...,"arguments":...} (arguments given as a JSON string are written as they are) -#}
{%- macro call_json(call) -%}
  {%- set fn = call.function if call.function is defined and call.function is mapping else call -%}
  {%- set args = fn.arguments if fn.arguments is defined and fn.arguments is not none else {} -%}
  {{- '{"name":' ~ (fn.name | tojson) ~ ',"arguments":' -}}
  {{- args if args is string else (args | tojson(separators=(',', ':'))) -}}
  {{- '}' -}}
{%- endmacro -%}

{%- set ns = namespace(tools='', calls='', reasoning=none) -%}
{%- if tools is defined and tools -%}
  {%- for tool in tools -%}
    {%- set ns.tools = ns.tools ~ (',\n' if not loop.first else '') ~ tool_json(tool) -%}
  {%- endfor -%}
  {%- set ns.tools = 'Tools:\n[\n' ~ ns.tools ~ '\n]\nReturn only a JSON function call.' -%}
  {%- if not (messages and messages[0].role in ('system', 'developer')) -%}
    {{- mark ~ names.system ~ head ~ mark ~ tail ~ ns.tools ~ turn_end -}}
  {%- endif -%}
{%- endif -%}

{%- for message in messages -%}
  {%- set role = message.role -%}
  {%- set content = text_of(message.content) -%}
  {%- if role in ('system', 'developer') -%}
    {%- set body = clean(content, collapse) -%}
    {%- if loop.first and ns.tools -%}
      {%- set body = (body ~ '\n' if body else '') ~ ns.tools -%}
    {%- endif -%}
    {{- mark ~ names.system ~ head ~ mark ~ tail ~ body ~ turn_end -}}
  {%- elif role == 'user' -%}
    {{- mark ~ names.user ~ head ~ mark ~ tail ~ clean(content, collapse) ~ turn_end -}}
  {%- elif role == 'tool' -%}
    {{- mark ~ names.user ~ head ~ mark ~ tail ~ 'Function output:\n' ~ clean(content, collapse) ~ turn_end -}}
  {%- elif role == 'assistant' -%}
    {%- if think_format -%}
      {%- set ns.reasoning = none -%}
      {%- for key in ('reasoning_content', 'reasoning', 'thinking') -%}
        {%- if ns.reasoning is none and message[key] is defined and message[key] is string -%}
          {%- set ns.reasoning = message[key] -%}
        {%- endif -%}
      {%- endfor -%}
      {%- if '</think>' in content -%}
        {%- set parts = content.split('</think>', 1) -%}
        {%- if ns.reasoning is none -%}
          {%- set ns.reasoning = parts[0].split('<think>')[-1] -%}
        {%- endif -%}
        {%- set content = parts[1] -%}
      {%- endif -%}
    {%- endif -%}
    {%- if message.tool_calls is defined and message.tool_calls -%}
      {%- set ns.calls = '' -%}
      {%- for call in message.tool_calls -%}
        {%- set ns.calls = ns.calls ~ ('\n' if not loop.first else '') ~ call_json(call) -%}
      {%- endfor -%}
      {%- set content = (content | trim) ~ ('\n' if content | trim else '') ~ '```json\n' ~ ns.calls ~ '\n```' -%}
    {%- endif -%}
    {%- set answer = clean(content, collapse) -%}
    {{- mark ~ names.assistant ~ head ~ mark -}}
    {%- if think_format -%}
      {%- set reasoning = clean(ns.reasoning if ns.reasoning is string else '', collapse) -%}
      {%- set think = tail ~ '<think>\n' ~ (reasoning ~ '\n' if reasoning else '') ~ '</think>' -%}
      {%- if train_think_part -%}
        {%- generation -%}{{- think ~ mark ~ '\n' ~ answer ~ turn_end -}}{%- endgeneration -%}
      {%- else -%}
        {{- think ~ mark -}}
        {%- generation -%}{{- '\n' ~ answer ~ turn_end -}}{%- endgeneration -%}
      {%- endif -%}
    {%- else -%}
      {%- generation -%}{{- tail ~ answer ~ turn_end -}}{%- endgeneration -%}
    {%- endif -%}
  {%- else -%}
    {{- raise_exception('message ' ~ loop.index ~ ': role ' ~ (role | tojson)
                        ~ ' is not one of system, user, assistant, tool') -}}
  {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
  {{- mark ~ names.assistant ~ head -}}
  {%- if think_format -%}
    {{- mark ~ tail ~ ('<think' if think_at_start else '<think>\n</think>') -}}
  {%- endif -%}
{%- endif -%}
"""

RWKV_TEMPLATE = "{#- rwkv_peft chat template: rwkv (User: ...\\n\\nAssistant: ...) -#}\n" \
                "{%- set think_format = false -%}" + _BODY
G1_TEMPLATE = "{#- rwkv_peft chat template: g1 (RWKV-7 G1, Assistant: <think>...</think>) -#}\n" \
              "{%- set think_format = true -%}" + _BODY

#: The named templates (what a recipe's ``data.template.name`` picks).
CHAT_TEMPLATES: Dict[str, str] = {"rwkv": RWKV_TEMPLATE, "g1": G1_TEMPLATE}
DEFAULT_TEMPLATE = "rwkv"


def default_chat_templates() -> Dict[str, str]:
    """The templates a tokenizer carries by default: ``{"default": rwkv, "rwkv": ..., "g1": ...}``.

    transformers picks ``"default"`` when ``apply_chat_template`` gets no ``chat_template``, and a name from the dict
    when it gets one (``chat_template="g1"``); ``save_pretrained`` writes them (``chat_template.jinja`` and
    ``additional_chat_templates/*.jinja``) and ``from_pretrained`` reads them back.
    """
    return {"default": CHAT_TEMPLATES[DEFAULT_TEMPLATE], **CHAT_TEMPLATES}


def template_source(name_or_source: str) -> str:
    """The Jinja source of a named template (``rwkv``, ``g1``), or the argument itself when it is Jinja source."""
    if name_or_source in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_source]
    if "{%" in name_or_source or "{{" in name_or_source:
        return name_or_source
    raise ValueError(f"unknown chat template {name_or_source!r}; the named templates are "
                     f"{', '.join(sorted(CHAT_TEMPLATES))}")


def template_fingerprint(name_or_source: str) -> str:
    """A short hash of a template's source (part of the datasets cache key of tokenized data)."""
    return hashlib.sha256(template_source(name_or_source).encode("utf-8")).hexdigest()[:16]


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(source: str) -> bool:
    """Whether a template marks assistant text with ``{% generation %}`` (needed for assistant masks)."""
    return bool(_GENERATION_TAG.search(source))


# A mark made of private-use characters (never produced by our templates; refused when an input contains it).
_MARK = "\ue000\U000f0000seg\U000f0000\ue000"


def _contains(value: Any, needle: str) -> bool:
    if isinstance(value, str):
        return needle in value
    if isinstance(value, Mapping):
        return any(_contains(k, needle) or _contains(v, needle) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_contains(v, needle) for v in value)
    return False


def _cut(text: str, spans: Sequence[Tuple[int, int]], mark: str) -> List[Segment]:
    """Cut ``text`` (which holds marks) at the marks and at the span edges; drop the marks; flag span text."""
    cuts = {0, len(text)}
    for s, e in spans:
        cuts.add(max(0, min(s, len(text))))
        cuts.add(max(0, min(e, len(text))))
    if mark:
        start = text.find(mark)
        while start >= 0:
            cuts.add(start)
            cuts.add(start + len(mark))
            start = text.find(mark, start + len(mark))
    points = sorted(cuts)
    out: List[Segment] = []
    for a, b in zip(points, points[1:]):
        piece = text[a:b]
        if not piece or (mark and piece == mark):
            continue
        trained = any(s <= a and b <= e for s, e in spans)
        out.append((piece, trained))
    return out


def render_segments(
    messages: Sequence[Mapping[str, Any]],
    chat_template: str = DEFAULT_TEMPLATE,
    *,
    tools: Optional[Sequence[Any]] = None,
    documents: Optional[Sequence[Any]] = None,
    add_generation_prompt: bool = False,
    continue_final_message: Union[bool, str] = False,
    **template_kwargs: Any,
) -> List[Segment]:
    """Render one conversation and cut it into ``[(text, trained), ...]``.

    ``chat_template`` is a name from :data:`CHAT_TEMPLATES` or Jinja source (any template: one without segment marks
    is cut only at its ``{% generation %}`` edges). A piece is *trained* when it lies inside a generation block.
    The pieces joined are exactly what ``apply_chat_template(..., tokenize=False)`` gives with the same arguments.

    Rendering goes through transformers' own renderer (``transformers.utils.chat_template_utils
    .render_jinja_template``, the function ``apply_chat_template`` calls), so the sandbox, filters and the
    ``{% generation %}`` tracking are transformers'.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    source = template_source(chat_template)
    if _contains(list(messages), _MARK) or _contains(tools, _MARK) or _contains(template_kwargs, _MARK):
        raise ValueError("a message contains the private-use characters used as rwkv_peft's segment mark")
    track = has_generation_blocks(source)
    rendered, spans = render_jinja_template(
        conversations=[list(messages)],
        tools=list(tools) if tools is not None else None,
        documents=documents,
        chat_template=source,
        return_assistant_tokens_mask=track,
        continue_final_message=continue_final_message,
        add_generation_prompt=add_generation_prompt,
        **{**template_kwargs, "segment_mark": _MARK},
    )
    return _cut(rendered[0], spans[0] if track else [], _MARK)
