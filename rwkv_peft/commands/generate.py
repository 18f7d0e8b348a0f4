"""rwkv-peft generate [MODEL] [--adapter DIR] (--prompt TEXT | --input prompts.jsonl --output out.jsonl)"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ._common import (  # noqa: F401
    MODEL_OPTIONAL_HELP, UsageError, add_placement_arguments, check_output, load_for_inference, shown,
)

HELP = "generate text from a model (.pth, folder or assets:NAME), optionally with an adapter folder or a state file"

EPILOG = """\
--input FILE: one JSON object a line, {"prompt": "..."} (the text to continue) or {"messages": [{"role": "user",
"content": "..."}, ...]} (rendered as chat renders a conversation, ending with "Assistant:"); a row may set its own
max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay. Each output row is
the input row plus "completion". Rows run in batches (--batch-size) with left padding: under greedy decoding each
completion is the one the prompt gets alone.

sampling (as the official rwkv package): the penalties on the raw logits, then top-p and top-k, then the
temperature; the penalties count the generated tokens, each count multiplied by --penalty-decay at every step.

examples:
  rwkv-peft generate assets:quickstart/model --prompt "User: hi"$'\\n\\n'"Assistant:" --temperature 0
  rwkv-peft generate --adapter outputs/quickstart/adapter --input prompts.jsonl --output out.jsonl --batch-size 16
"""

# per-row settings an --input row may set, with their types
ROW_SETTINGS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                "presence_penalty": float, "frequency_penalty": float, "penalty_decay": float}


def add_sampling_arguments(p, temperature=1.0, top_p=0.7, top_k=0, max_new_tokens=100) -> None:
    """The sampling options ``generate`` and ``chat`` share."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling on the untempered probabilities "
                                                              "(1: off)")
    p.add_argument("--top-k", type=int, default=top_k, help="keep the k most likely tokens (0: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated (official "
                        "PIPELINE_ARGS: 0.2)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted once per (decayed) occurrence of a generated token (official "
                        "PIPELINE_ARGS: 0.2)")
    p.add_argument("--penalty-decay", type=float, default=0.996,
                   help="the occurrence counts are multiplied by this at each generated token")
    p.add_argument("--seed", type=int)


def add_arguments(p):
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("model", nargs="?", help=MODEL_OPTIONAL_HELP)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue ('-' reads standard input)")
    what.add_argument("--input", help="a .jsonl file of prompts (see below); needs --output")
    p.add_argument("--output", help="the .jsonl file --input's completions are written to (atomically)")
    p.add_argument("--batch-size", type=int, default=8, help="--input rows generated together (default 8)")
    p.add_argument("--user", default="User", help="the user's role name for --input rows with messages")
    p.add_argument("--assistant", default="Assistant", help="the assistant's role name for rows with messages")
    from ..tokenization.chat_templates import CHAT_TEMPLATES
    p.add_argument("--template", default="rwkv", choices=sorted(CHAT_TEMPLATES),
                   help="the chat template rows with messages are written in (as data.template.name in training)")
    p.add_argument("--adapter", help="an adapter folder written by training (LoRA and/or state), or its Hub "
                                     "repository id")
    p.add_argument("--state", help="a state file (runtime .pth with blocks.N.att.time_state, or .safetensors)")
    p.add_argument("--tokenizer", help="'world' or a tokenizer folder (default: the adapter's, else the model "
                                       "folder's, else the World tokenizer)")
    add_sampling_arguments(p)
    add_placement_arguments(p)


def settings_of(args) -> Dict[str, float]:
    s = {k: getattr(args, k) for k in ROW_SETTINGS}
    _check_settings(s, "")
    return s


def _check_settings(s: Dict, where: str) -> None:
    from ..sampling import check_settings
    try:
        check_settings(**{k: s[k] for k in ("temperature", "top_p", "top_k", "penalty_decay", "max_new_tokens")})
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        opt = f"field '{name}'" if where else "--" + name.replace("_", "-")
        raise UsageError(f"{where}{opt}: {e}") from None


# ---- reading --input --------------------------------------------------------------------------------------

def read_prompts(path: Path, defaults: Dict, user: str = "User", assistant: str = "Assistant",
                 template: str = "rwkv") -> List[Tuple[dict, str, Dict]]:
    """[(the row, its prompt text, its settings)] of a jsonl file; :class:`UsageError` naming the file, line and
    field of the first bad row."""
    from .chat import render_messages
    rows = []
    name = shown(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} line {n}: "
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}expected a JSON object like {{\"prompt\": \"...\"}}, found "
                             f"{type(row).__name__}")
        if "prompt" in row and "messages" in row:
            raise UsageError(f"{where}has both 'prompt' and 'messages'; give one")
        if "prompt" in row:
            prompt = row["prompt"]
            if not isinstance(prompt, str):
                raise UsageError(f"{where}field 'prompt' should be text, found {type(prompt).__name__}")
            if not prompt.strip():
                raise UsageError(f"{where}field 'prompt' is empty")
        elif "messages" in row:
            try:
                prompt = render_messages(row["messages"], user, assistant, template)
            except ValueError as e:
                raise UsageError(f"{where}field 'messages': {e}") from None
        else:
            raise UsageError(f"{where}no 'prompt' or 'messages' field; the row has: "
                             f"{', '.join(sorted(row)) or 'nothing'}")
        settings = dict(defaults)
        for key, kind in ROW_SETTINGS.items():
            if key not in row or row[key] is None:
                continue
            value = row[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int and ok and float(value) != int(value):
                ok = False
            if not ok:
                raise UsageError(f"{where}field '{key}' should be {'an integer' if kind is int else 'a number'}, "
                                 f"found {json.dumps(value)}")
            settings[key] = kind(value)
        _check_settings(settings, where)
        rows.append((row, prompt, settings))
    if not rows:
        raise UsageError(f"{name}: no rows (expected one JSON object a line, e.g. {{\"prompt\": \"...\"}})")
    return rows


# ---- generation ---------------------------------------------------------------------------------------------

def stop_ids_of(tok) -> List[int]:
    stop = {0}  # RWKV's end of text
    if getattr(tok, "eos_token_id", None) is not None:
        stop.add(int(tok.eos_token_id))
    return sorted(stop)


def generate_batch(model, prompts: Sequence[Sequence[int]], settings: Dict, stop_ids: Sequence[int] = (0,),
                   uncounted_ids: Sequence[int] = (), pad_id: int = 0, streamer=None) -> List[List[int]]:
    """The generated ids of each prompt (token ids), run as one left-padded batch; each list ends before the first
    stop token. Under greedy decoding each row is what the prompt gives alone (padding leaves the state as it
    is, and the penalties count each row's own generated tokens)."""
    import torch

    from ..sampling import generate_kwargs, logits_processors
    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    procs = logits_processors(settings["temperature"], settings["top_p"], settings["top_k"],
                              settings["presence_penalty"], settings["frequency_penalty"], settings["penalty_decay"],
                              prompt_length=width, uncounted_ids=uncounted_ids)
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=int(settings["max_new_tokens"]), pad_token_id=pad_id,
                             eos_token_id=list(stop_ids), streamer=streamer,
                             **generate_kwargs(procs, settings["temperature"]))
    result = []
    stops = set(int(s) for s in stop_ids)
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def generate_rows(model, tok, rows: List[Tuple[dict, str, Dict]], batch_size: int, progress=None,
                  stream=None) -> List[str]:
    """The completion of each (row, prompt, settings), in the rows' order. Rows with the same settings run
    together, longest first (less padding), ``batch_size`` at a time. ``stream`` (a text file, one row only):
    print the completion there as it is generated."""
    from ..sampling import uncounted_token_ids
    encoded = []
    for row, prompt, _ in rows:
        encoded.append(tok(prompt).input_ids)
    uncounted = uncounted_token_ids(tok) if any(s["frequency_penalty"] for _, _, s in rows) else []
    stop = stop_ids_of(tok)
    groups: Dict[Tuple, List[int]] = {}
    for i, (_, _, s) in enumerate(rows):
        groups.setdefault(tuple(sorted(s.items())), []).append(i)
    completions: List[Optional[str]] = [None] * len(rows)
    done = 0
    for members in groups.values():
        members = sorted(members, key=lambda i: -len(encoded[i]))
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            streamer = PrintStreamer(tok, stop, stream) if stream is not None else None
            outs = generate_batch(model, [encoded[i] for i in chunk], rows[chunk[0]][2], stop, uncounted,
                                  streamer=streamer)
            for i, gen in zip(chunk, outs):
                completions[i] = tok.decode(gen, skip_special_tokens=True)
            done += len(chunk)
            if progress:
                progress(done, len(rows))
    return completions


class PrintStreamer:
    """A ``generate(streamer=...)`` for one row: writes each new token's text as it comes (the prompt skipped,
    nothing from the first stop token on), decoded incrementally, then a newline."""

    def __init__(self, tok, stop_ids: Sequence[int], out):
        from ._common import StreamDecoder
        self.decoder, self.stops, self.out = StreamDecoder(tok, skip_special_tokens=True), set(stop_ids), out
        self.prompt_seen = self.stopped = False

    def put(self, value):
        if not self.prompt_seen:  # generate() hands the prompt first
            self.prompt_seen = True
            return
        for t in value.flatten().tolist():
            self.stopped = self.stopped or t in self.stops
            if not self.stopped:
                self.out.write(self.decoder.put(t))
                self.out.flush()

    def end(self):
        self.out.write(self.decoder.end() + "\n")
        self.out.flush()


def run(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = settings_of(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size should be >= 1, got {args.batch_size}")
    if args.input is not None:
        from ._common import resolve_input
        if not args.output:
            raise UsageError("--input needs --output FILE.jsonl (where the completions go)")
        out_path, _ = check_output(args.output, {".jsonl": "one JSON row per prompt"}, arg="--output",
                                   command="generate")
        in_path = resolve_input(args.input, "--input", kind="input")
        if in_path.is_dir():
            raise UsageError(f"--input {args.input!r} is a folder; expected a .jsonl file")
        if in_path.resolve() == out_path.resolve():
            raise UsageError(f"--output {args.output!r} is the --input file; write the completions elsewhere")
        rows = read_prompts(in_path, defaults, args.user, args.assistant, args.template)  # every row checked before the model loads
    else:
        if args.output:
            raise UsageError("--output goes with --input FILE.jsonl; --prompt prints the completion")
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt:
            raise UsageError("--prompt is empty")
        rows = [({}, prompt, defaults)]
    model, tok = load_for_inference(args.model, args.adapter, args.tokenizer, args.dtype, device, state=args.state,
                                    cpu_weights=args.cpu_weights)
    for row, prompt, _ in rows:
        if not tok(prompt).input_ids:
            raise UsageError("the prompt gives no tokens" if args.input is None else
                             f"{shown(in_path)}: a row's prompt gives no tokens: {prompt!r}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.input is None:  # the completion, printed as it is generated
        generate_rows(model, tok, rows, 1, stream=sys.stdout)
        return 0

    def progress(done, total):
        if sys.stderr.isatty():
            print(f"\r{done}/{total} prompts", end="" if done < total else "\n", file=sys.stderr, flush=True)

    completions = generate_rows(model, tok, rows, args.batch_size, progress)
    from ..convert import atomic_path
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for (row, _, _), completion in zip(rows, completions):
                f.write(json.dumps({**row, "completion": completion}, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} completions to {shown(out_path)}", file=sys.stderr)
    return 0
