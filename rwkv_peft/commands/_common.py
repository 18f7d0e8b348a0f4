"""What the sub-commands share: reading MODEL / --adapter arguments, checking output paths, loading a model for
inference, and decoding generated tokens as a stream.

Every model argument accepts what a recipe's ``model.path`` accepts (``rwkv_peft.paths``): ``assets:NAME``, ``~``,
a BlinkDL ``.pth``, one of our Hugging Face folders or an fla folder. Given an adapter and no model, the base is
the one the adapter's manifest records. A bad argument raises :class:`UsageError`, which ``rwkv_peft.cli`` prints
as ``error: ...`` with exit code 2.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..errors import RWKVPeftError

MODEL_HELP = ("the base model: a BlinkDL .pth, a Hugging Face model folder, assets:NAME (the models that ship "
              "with rwkv-peft, e.g. assets:quickstart/model), or a Hub repository id (owner/name)")
MODEL_OPTIONAL_HELP = MODEL_HELP + "; default with --adapter: the base recorded in the adapter"
FOLDER = ""  # the "suffix" of a folder output in check_output's table


class UsageError(RWKVPeftError):
    """A bad argument (a path that is not there, an output the command cannot write, ...): exit code 2."""

    exit_code = 2


# ---- input paths -------------------------------------------------------------------------------------------

def shown(path: Union[str, os.PathLike]) -> str:
    """A path for messages and printed commands: as the user gave it, never made absolute (``rwkv_peft.paths``)."""
    from ..paths import portable_path
    return portable_path(path)


def quoted(path: Union[str, os.PathLike]) -> str:
    """``shown(path)`` quoted for a shell command line (``~/`` stays unquoted so the shell expands it)."""
    text = shown(path)
    if text.startswith("~/"):
        return "~/" + shlex.quote(text[2:]) if shlex.quote(text[2:]) != text[2:] else text
    return shlex.quote(text)


def resolve_input(spec: Union[str, os.PathLike], arg: str, kind: str = "model") -> Path:
    """The path a MODEL / --adapter / SRC argument names; :class:`UsageError` if it is not there."""
    from ..paths import ASSETS_PREFIX, HubError, local_or_hub, resolve_path
    text = os.fspath(spec)
    try:  # models and adapters may also be Hub repository ids (local_or_hub says which reads as one)
        path = local_or_hub(text) if kind in ("model", "adapter") else resolve_path(text)
    except HubError as e:
        raise UsageError(f"{arg} {e}") from None
    if path.exists():
        return path
    if text.startswith(ASSETS_PREFIX):
        from ..recipe import ASSETS_DIR
        have = sorted(f"assets:{p.parent.relative_to(ASSETS_DIR).as_posix()}"
                      for p in ASSETS_DIR.rglob("config.json"))
        hint = f"the package ships {', '.join(have)}" if have else "the package ships no models"
    elif kind == "model":
        hint = "expected a BlinkDL .pth, a Hugging Face model folder, or assets:NAME"
    elif kind == "adapter":
        hint = "expected an adapter folder written by training (e.g. outputs/<run>/adapter)"
    else:
        hint = ""
    raise UsageError(f"{arg} {text!r}: no such file or folder" + (f" ({hint})" if hint else ""))


def is_adapter_dir(path: Path) -> bool:
    from ..methods.adapter_io import MANIFEST
    from ..tuners.state_tuning import STATE_FILE
    return path.is_dir() and any((path / f).is_file() for f in (MANIFEST, "adapter_config.json", STATE_FILE))


def resolve_adapter(spec: Union[str, os.PathLike], arg: str = "--adapter") -> Path:
    path = resolve_input(spec, arg, kind="adapter")
    if not is_adapter_dir(path):
        raise UsageError(f"{arg} {os.fspath(spec)!r}: not an adapter folder (no rwkv_peft_adapter.json, "
                         f"adapter_config.json or state_adapter.safetensors in it)")
    return path


def resolve_base(model: Optional[str], adapter: Optional[Union[str, os.PathLike]], model_arg: str = "MODEL",
                 adapter_arg: str = "--adapter") -> Tuple[str, Path]:
    """(the base as the user would write it, its path): MODEL when given, else the adapter's recorded base."""
    if model:
        return os.fspath(model), resolve_input(model, model_arg)
    if adapter is None:
        raise UsageError(f"no model given: pass {model_arg} (a BlinkDL .pth, a Hugging Face model folder or "
                         f"assets:NAME), or {adapter_arg} DIR to use the base recorded in that adapter")
    from ..paths import BaseNotFoundError, adapter_base
    adapter_path = adapter if isinstance(adapter, Path) else resolve_adapter(adapter, adapter_arg)
    try:
        return adapter_base(adapter_path)
    except BaseNotFoundError as e:
        raise UsageError(f"{adapter_arg}: {e}; pass {model_arg} to say which base to use") from None


# ---- output paths ------------------------------------------------------------------------------------------

def check_output(out: str, writes: Dict[str, str], arg: str = "OUT", command: str = "",
                 hint: str = "") -> Tuple[Path, str]:
    """(path, kind) when ``out``'s suffix is one ``writes`` has ({'.pth': 'BlinkDL checkpoint', FOLDER: 'Hugging
    Face model'}), kind being that suffix ('' for a folder); else :class:`UsageError` listing what can be written.
    A folder is a name without a suffix, a name ending in '/', or an existing folder."""
    path = Path(out)
    is_folder = out.endswith(("/", os.sep)) or path.is_dir()
    suffix = FOLDER if is_folder else path.suffix.lower()
    if suffix in writes:
        return path, suffix
    options = [f"a {s} file ({what})" if s else f"a folder ({what}: a name without a suffix, or ending in '/')"
               for s, what in writes.items()]
    listed = ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]
    what = f"{suffix} files" if suffix else "folders"
    raise UsageError(f"{arg} {out!r}: {command or 'this command'} does not write {what}; it writes {listed}"
                     + (f" ({hint})" if hint else ""))


def write_model(model, out: Path, kind: str, dtype: Optional[str] = None,
                tokenizer_from: Iterable[Optional[Path]] = ()) -> str:
    """Write a merged plain model as a BlinkDL .pth (``kind`` '.pth') or a Hugging Face folder (``kind`` '') that
    also holds the first tokenizer found in ``tokenizer_from`` (folders); atomic. Returns a one-line description.
    """
    import sys

    from ..convert import atomic_path
    from ..merge import save_merged
    sources = [p for p in tokenizer_from if p is not None]
    if kind == ".pth":
        desc = save_merged(model, out, dtype=dtype)
        tok_src = next((p for p in sources if p.is_dir() and (p / "tokenizer_config.json").is_file()), None)
        if tok_src is not None and getattr(model.config, "vocab_size", 65536) != 65536:
            print(f"note: a .pth holds no tokenizer; pass --tokenizer {quoted(tok_src)} when you use "
                  f"{quoted(out)} (chat, generate)", file=sys.stderr)
        return desc.replace(str(out), shown(out), 1)
    with atomic_path(out, is_dir=True) as tmp:
        desc = save_merged(model, tmp, dtype=dtype, tokenizer=False)
        src = copy_tokenizer(sources, tmp)
        if src is None and getattr(model.config, "vocab_size", None) == 65536:
            from ..tokenization import RWKVWorldTokenizer
            RWKVWorldTokenizer().save_pretrained(str(tmp))
    desc = desc.replace(str(tmp), shown(out), 1)
    return desc + (f" + the tokenizer of {shown(src)}" if src is not None else "")


def convert_model(src: Path, out: Path, kind: str, dtype: Optional[str] = None) -> str:
    """``rwkv_peft.convert.convert`` with the source folder's tokenizer carried into a folder output."""
    import sys

    from ..convert import atomic_path, convert
    if src.resolve() == out.resolve():
        raise UsageError(f"{shown(out)}: the destination is the source")
    if kind == ".pth":
        desc = convert(src, out, dtype=dtype)
        if src.is_dir() and (src / "tokenizer_config.json").is_file():
            print(f"note: a .pth holds no tokenizer; pass --tokenizer {quoted(src)} when you use {quoted(out)} "
                  f"(chat, generate)", file=sys.stderr)
        return desc.replace(str(src), shown(src), 1)
    with atomic_path(out, is_dir=True) as tmp:
        desc = convert(src, tmp, dtype=dtype)
        copy_tokenizer([src], tmp)
    return desc.replace(str(src), shown(src), 1).replace(str(tmp), shown(out), 1)


# ---- models and tokenizers for inference -------------------------------------------------------------------

def load_tokenizer_for(model_path: Optional[Path], adapter_path: Optional[Path] = None,
                       tokenizer: Optional[str] = None, vocab_size: Optional[int] = None):
    """The tokenizer: ``tokenizer`` ('world' or a folder spec), else the adapter folder's (what training used),
    else the model folder's, else the RWKV World tokenizer. Checked against the model's vocabulary size."""
    from transformers import AutoTokenizer

    from ..tokenization import RWKVWorldTokenizer

    def has_tok(p):
        return p is not None and p.is_dir() and (p / "tokenizer_config.json").is_file()

    if tokenizer and tokenizer != "world":
        src, where = resolve_input(tokenizer, "--tokenizer", kind="tokenizer"), f"--tokenizer {tokenizer!r}"
    elif tokenizer == "world":
        src, where = None, "--tokenizer world"
    elif has_tok(adapter_path):
        src, where = adapter_path, f"the tokenizer in {shown(adapter_path)}"
    elif has_tok(model_path):
        src, where = model_path, f"the tokenizer in {shown(model_path)}"
    else:
        src, where = None, "the RWKV World tokenizer (the default: no tokenizer beside the model or adapter)"
    try:
        tok = AutoTokenizer.from_pretrained(str(src)) if src is not None else RWKVWorldTokenizer()
    except Exception as e:  # noqa: BLE001 - a folder without a readable tokenizer
        raise UsageError(f"{where}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    if vocab_size is not None and len(tok) > vocab_size:
        raise UsageError(f"{where} has {len(tok):,} tokens but the model's vocabulary has {vocab_size:,}: they "
                         f"do not belong together; pass --tokenizer FOLDER (the tokenizer the model was trained "
                         f"with)")
    return tok


def add_placement_arguments(p) -> None:
    """--dtype, --device and --cpu-weights: where and how ``chat`` / ``generate`` hold the model."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--cpu-weights", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="on the CPU, how the big projections and the head are stored: fp32 (exact), fp16 (error "
                        "about 1e-3) or int8 (1.6-1.9x the decode speed of fp32, an error like the official "
                        "package's bf16 mode); fp16 / int8 need an x86 CPU (docs/benchmarks.md)")


def load_for_inference(model_path=None, adapter=None, tokenizer=None, dtype="float32", device="cpu",
                       state=None, cpu_weights="fp32"):
    """(model, tokenizer) ready for generation; shared by ``generate`` and ``chat``.

    ``model_path`` and ``adapter`` are path specs (``assets:...``, ``~``); without ``model_path`` the adapter's
    recorded base is used. ``state`` is a state file (runtime .pth / .safetensors) or adapter folder put on top.
    """
    import torch

    from .. import methods
    from ..methods.adapter_io import AdapterMismatchError
    from ..models.rwkv7.convert_rwkv7 import CheckpointError

    adapter_path = resolve_adapter(adapter) if adapter else None
    _, base = resolve_base(model_path, adapter_path)
    try:
        model = methods.load_base_model(base, dtype=dtype)
    except (CheckpointError, OSError, ValueError) as e:  # not a checkpoint, a broken folder, ...
        raise UsageError(f"{shown(base)}: cannot load the model ({e})" if not isinstance(e, CheckpointError)
                         else str(e)) from None
    if adapter_path is not None:
        try:
            model = methods.load_adapter(model, adapter_path)
        except (AdapterMismatchError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    if state:
        state_path = resolve_input(state, "--state", kind="state")
        try:
            model = methods.apply_state_tuning(model, init=str(state_path))
        except (ValueError, FileNotFoundError, CheckpointError) as e:
            raise UsageError(f"--state {state!r}: {e}") from None
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":  # decoding reads every weight per token: fewer bytes, faster layout
        model = methods.prepare_for_cpu_decoding(model, cpu_weights)
    elif cpu_weights != "fp32":
        raise UsageError(f"--cpu-weights {cpu_weights}: for decoding on the CPU, but the device is {device}")
    cfg = getattr(model, "config", None)
    tok = load_tokenizer_for(base, adapter_path, tokenizer, getattr(cfg, "vocab_size", None))
    return model, tok


def copy_tokenizer(sources: Iterable[Optional[Path]], dst: Path) -> Optional[Path]:
    """Save the first tokenizer found in ``sources`` (folders) into ``dst``; returns where it came from."""
    from transformers import AutoTokenizer
    for src in sources:
        if src is not None and src.is_dir() and (src / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
            return src
    return None


# ---- streaming decode --------------------------------------------------------------------------------------

class StreamDecoder:
    """Incremental decoding for any transformers tokenizer: ``put(ids)`` returns only the newly completed text.

    It decodes a short window of the growing id list (the ids already shown as context plus the new ones) and
    returns what the new ids add, holding it back while the text ends in U+FFFD (an incomplete UTF-8 sequence,
    e.g. the first byte token of 'é') or the window's text does not yet extend the text already shown (tokenizers
    that change earlier text as more arrives). Decoding the window with its context keeps the spaces and
    merges that depend on neighbouring tokens (SentencePiece, byte-level BPE) exactly as a whole decode has them.
    ``end()`` flushes what is left (an unfinished character then shows as U+FFFD).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self.ids: List[int] = []
        self._prefix = 0   # start of the context window
        self._read = 0     # ids before this are shown

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def put(self, token_ids) -> str:
        if isinstance(token_ids, int) or getattr(token_ids, "ndim", 1) == 0:
            token_ids = [token_ids]
        self.ids.extend(int(t) for t in token_ids)
        shown_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(shown_text) and text.startswith(shown_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(shown_text):]
        return ""

    def end(self) -> str:
        shown_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        common = len(os.path.commonprefix([shown_text, text]))
        self._prefix = self._read = len(self.ids)
        return text[common:] if len(text) > common else ""
