"""The RWKV "World" tokenizer (vocabulary v20230424) as a transformers tokenizer.

The World tokenizer has no pre-tokenizer and no merges: it is a greedy longest match on the UTF-8 bytes of the
text against a table of 65,529 byte strings (ids 1..65529). Id 0 is the end-of-text / padding id; ids 65530..65535
exist in the model's embedding but are never produced.

Vocabulary data: ``rwkv_vocab_v20230424.txt`` next to this module is a verbatim copy of the file shipped in the
official ``rwkv`` PyPI package (``rwkv/rwkv_vocab_v20230424.txt``, https://github.com/BlinkDL/ChatRWKV,
Apache-2.0). Each line is ``<id> <Python literal of the token (str or bytes)> <length in bytes>``.

Two encoders give the same ids (see docs/tokenizer.md):

* ``pyrwkv`` - the compiled ``pyrwkv_tokenizer`` package, used when it is installed and passes a self-check.
* ``python`` - :class:`GreedyByteEncoder`, written here in pure Python (with numpy to find the places where no
  token can cross), 4-5x faster than the official pure-Python trie on mixed text.

Behaviour on dirty data:

* Lone surrogates (which cannot be encoded as UTF-8; the official tokenizer raises on them) are encoded as if each
  were U+FFFD; a high+low surrogate pair written as two code points is encoded as the character it stands for.
* ``decode`` never raises on ids that form invalid UTF-8 (a partial character, as happens mid-generation): invalid
  or incomplete byte sequences become U+FFFD (``errors="replace"``, configurable). :meth:`stream_decoder` holds an
  incomplete character back until its remaining bytes arrive.
* Nothing is added around the text by default (RWKV uses no BOS); id 0 is appended only with ``append_eos=True``.
* ``split_special_tokens`` defaults to True, so the literal text ``<|endoftext|>`` is encoded as bytes, exactly as
  the official tokenizer does; pass ``split_special_tokens=False`` to have added/special tokens recognised in text.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import os
import re
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import (
    VERY_LARGE_INTEGER,
    BatchEncoding,
    PaddingStrategy,
    TruncationStrategy,
)

from .chat_templates import default_chat_templates, render_segments

__all__ = [
    "RWKVWorldTokenizer",
    "WorldStreamDecoder",
    "GreedyByteEncoder",
    "load_world_vocab",
    "DEFAULT_VOCAB_FILE",
    "EOS_TOKEN",
    "VOCAB_SIZE",
]

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
DEFAULT_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_FILE_NAME)
VOCAB_SIZE = 65536
EOS_TOKEN = "<|endoftext|>"
# sha256 of the official vocabulary file after "\r\n" -> "\n" (the rwkv package ships it with "\r\n").
OFFICIAL_VOCAB_SHA256 = "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"
BACKEND_ENV = "RWKV_PEFT_TOKENIZER_BACKEND"  # "auto" (default) | "pyrwkv" | "python"

_MAX_MEMO_ENTRIES = 1 << 20  # pieces remembered by the pure-Python encoder before its memo is cleared
_MAX_MEMO_PIECE = 64  # longest piece (bytes) worth remembering


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------

_VOCAB_CACHE: dict[tuple, tuple[tuple[bytes | None, ...], str]] = {}
_CACHE_LOCK = threading.Lock()


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def load_world_vocab(path: str | os.PathLike | None = None) -> tuple[bytes | None, ...]:
    """Read a World vocabulary file; returns a tuple of 65536 entries, ``table[id]`` = token bytes or None.

    Every line must be ``<id> <str or bytes literal> <byte length>`` with 1 <= id < 65536; the file, line and what was
    expected are named in the error otherwise. Results are cached per file (path, size, mtime).
    """
    return _load_vocab_with_hash(DEFAULT_VOCAB_FILE if path is None else os.fspath(path))[0]


def _load_vocab_with_hash(path: str) -> tuple[tuple[bytes | None, ...], str]:
    try:
        key = _file_key(path)
    except OSError as exc:
        raise FileNotFoundError(f"RWKV World vocabulary file {path!r} cannot be read: {exc}") from exc
    with _CACHE_LOCK:
        hit = _VOCAB_CACHE.get(key)
    if hit is not None:
        return hit
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"RWKV World vocabulary file {path!r} is not UTF-8 text: {exc}") from exc
    table: list[bytes | None] = [None] * VOCAB_SIZE
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")  # only "\n" separates lines; str.splitlines would also split on U+2028 etc.
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        where = f"RWKV World vocabulary file {path!r}, line {lineno}"
        if first <= 0 or last <= first:
            raise ValueError(f"{where}: expected '<id> <token literal> <byte length>', got {line[:80]!r}")
        try:
            idx = int(line[:first])
            length = int(line[last + 1 :])
            tok = ast.literal_eval(line[first + 1 : last])
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{where}: expected '<id> <token literal> <byte length>', got {line[:80]!r}") from exc
        if isinstance(tok, str):
            tok = tok.encode("utf-8")
        if not isinstance(tok, bytes) or not tok:
            raise ValueError(f"{where}: the token must be a non-empty str or bytes literal, got {tok!r}")
        if len(tok) != length:
            raise ValueError(f"{where}: the token is {len(tok)} bytes but the line says {length}")
        if not 1 <= idx < VOCAB_SIZE:
            raise ValueError(f"{where}: id {idx} is outside 1..{VOCAB_SIZE - 1} (id 0 is reserved for end-of-text)")
        if table[idx] is not None:
            raise ValueError(f"{where}: id {idx} appears twice")
        table[idx] = tok
    if len(set(t for t in table if t is not None)) != sum(t is not None for t in table):
        raise ValueError(f"RWKV World vocabulary file {path!r}: the same token appears under two ids")
    missing = [b for b in range(256) if bytes([b]) not in set(table)]
    if missing:
        raise ValueError(
            f"RWKV World vocabulary file {path!r}: every single byte must be a token (greedy matching needs it); "
            f"missing bytes {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    result = (tuple(table), digest)
    with _CACHE_LOCK:
        _VOCAB_CACHE[key] = result
    return result


# ----------------------------------------------------------------------------------------------------------------
# Text <-> bytes policy
# ----------------------------------------------------------------------------------------------------------------


def _clean_surrogates(text: str) -> str:
    """Join surrogate pairs written as two code points and turn lone surrogates into U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def text_to_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text`` under the tokenizer's surrogate policy (never raises for a str)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _clean_surrogates(text).encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Pure-Python encoder
# ----------------------------------------------------------------------------------------------------------------


class GreedyByteEncoder:
    """Greedy longest-match encoder over bytes, in pure Python (plus numpy for one vectorised step).

    Same result as the official ``TRIE_TOKENIZER``: at each position take the longest vocabulary token that
    matches there. Two things make it faster than walking a trie over the whole input:

    * A cut between bytes ``a`` and ``b`` is *forced* when no token contains the adjacent pair ``ab``: no token can
      cross it, so greedy matching of the whole input equals greedy matching of each piece between forced cuts
      (every token ends at or before the cut, and tokens tile the input). For natural text these pieces are
      word-sized (``" the"``, ``"\\n    "``), and they repeat, so the ids of short pieces are memoised.
    * Pieces not in the memo are matched with a trie of nested dicts walked by a tight loop.
    """

    def __init__(self, table: Sequence[bytes | None]):
        import numpy as np

        self._np = np
        root: dict[int, list] = {}
        pair_ok = np.zeros(65536, dtype=bool)
        max_len = 1
        for idx, tok in enumerate(table):
            if not tok:
                continue
            node, entry = root, None
            for byte in tok:
                entry = node.get(byte)
                if entry is None:
                    entry = node[byte] = [{}, 0]
                node = entry[0]
            entry[1] = idx
            max_len = max(max_len, len(tok))
            if len(tok) > 1:
                arr = np.frombuffer(tok, dtype=np.uint8).astype(np.uint16)
                pair_ok[(arr[:-1] << 8) | arr[1:]] = True
        self._root = root
        self._pair_ok = pair_ok
        self._max_len = max_len
        self._memo: dict[bytes, list[int]] = {}

    # -- the core walk --------------------------------------------------------------------------------------------
    def _walk(self, data: bytes) -> list[int]:
        root, max_len = self._root, self._max_len
        out: list[int] = []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            node, best, end, j = root, 0, i, i
            for byte in data[i : i + max_len]:
                entry = node.get(byte)
                if entry is None:
                    break
                j += 1
                node, tid = entry
                if tid:
                    best, end = tid, j
            append(best)  # every single byte is a token, so best is set and end > i
            i = end
        return out

    def _cuts(self, data: bytes) -> list[int]:
        """Positions p (0 < p < len) where no token can contain data[p-1:p+1]."""
        np = self._np
        if len(data) < 2:
            return []
        arr = np.frombuffer(data, dtype=np.uint8)
        pairs = (arr[:-1].astype(np.uint16) << 8) | arr[1:]
        return (np.flatnonzero(~self._pair_ok[pairs]) + 1).tolist()

    def _encode_pieces(self, data: bytes, cuts: Iterable[int], start: int, stop: int, out: list[int]) -> None:
        memo, walk = self._memo, self._walk
        if len(memo) > _MAX_MEMO_ENTRIES:
            memo.clear()
        get = memo.get
        extend = out.extend
        s = start
        for e in cuts:
            piece = data[s:e]
            ids = get(piece)
            if ids is None:
                ids = walk(piece)
                if e - s <= _MAX_MEMO_PIECE:
                    memo[piece] = ids
            extend(ids)
            s = e
        if s < stop:
            piece = data[s:stop]
            ids = get(piece)
            if ids is None:
                ids = walk(piece)
                if stop - s <= _MAX_MEMO_PIECE:
                    memo[piece] = ids
            extend(ids)

    # -- public -----------------------------------------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of arbitrary bytes (invalid UTF-8 included), exactly as ``TRIE_TOKENIZER.encodeBytes``."""
        data = bytes(data)
        if len(data) <= 16:
            return self._walk(data)
        out: list[int] = []
        self._encode_pieces(data, self._cuts(data), 0, len(data), out)
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text_to_bytes(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts with one vectorised cut search over their concatenation."""
        blobs = [text_to_bytes(t) for t in texts]
        data = b"".join(blobs)
        cuts = self._cuts(data)
        results: list[list[int]] = []
        pos = 0
        for blob in blobs:
            end = pos + len(blob)
            out: list[int] = []
            if blob:
                lo, hi = bisect_right(cuts, pos), bisect_left(cuts, end)
                self._encode_pieces(data, cuts[lo:hi], pos, end, out)
            results.append(out)
            pos = end
        return results


# ----------------------------------------------------------------------------------------------------------------
# Backends (shared per vocabulary content and process; immutable apart from the pure-Python memo)
# ----------------------------------------------------------------------------------------------------------------

_PY_ENCODERS: dict[str, GreedyByteEncoder] = {}
_PYRWKV: dict[str, Any] = {}
# Exceptions never swallowed when falling back from pyrwkv (a Rust panic arrives as a BaseException).
_NOT_RECOVERABLE = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)


def _python_encoder(vocab_key: str, table: Sequence[bytes | None]) -> GreedyByteEncoder:
    with _CACHE_LOCK:
        enc = _PY_ENCODERS.get(vocab_key)
    if enc is None:
        enc = GreedyByteEncoder(table)
        with _CACHE_LOCK:
            enc = _PY_ENCODERS.setdefault(vocab_key, enc)
    return enc


def _pyrwkv_encoder(vocab_key: str, vocab_file: str | None, table: Sequence[bytes | None], digest: str):
    """The compiled encoder, or None when it is missing, the vocabulary is not the official one, or its self-check
    fails."""
    with _CACHE_LOCK:
        if vocab_key in _PYRWKV:
            return _PYRWKV[vocab_key]
    enc = None
    if digest == OFFICIAL_VOCAB_SHA256:
        try:
            import pyrwkv_tokenizer

            path = vocab_file if vocab_file and os.path.isfile(vocab_file) else DEFAULT_VOCAB_FILE
            candidate = pyrwkv_tokenizer.RWKVTokenizer(vocab_filepath=path)
            # Self-check: every token that is valid UTF-8 must come back as exactly its own id.
            texts, ids = [], []
            for idx, tok in enumerate(table):
                if tok is None:
                    continue
                try:
                    texts.append(tok.decode("utf-8"))
                except UnicodeDecodeError:
                    continue
                ids.append([idx])
            if candidate.encode_batch(texts) == ids:
                enc = candidate
        except BaseException as exc:  # ImportError, a changed API, a bad build, a panic: use pure Python
            if isinstance(exc, _NOT_RECOVERABLE):
                raise
            enc = None
    with _CACHE_LOCK:
        return _PYRWKV.setdefault(vocab_key, enc)


# ----------------------------------------------------------------------------------------------------------------
# Token strings (only for tokenize() / convert_ids_to_tokens(); encode and decode work on ids and bytes)
# ----------------------------------------------------------------------------------------------------------------


def _byte_to_char_table() -> list[str]:
    """A printable character for every byte: visible Latin-1 bytes stand for themselves, the rest (controls, space,
    DEL, NBSP, soft hyphen) take code points from U+0100 upward in byte order."""
    table, extra = [], 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + extra))
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_to_char_table()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


def _reserved_name(idx: int) -> str:
    return f"<|reserved_{idx}|>"


_STRING_TABLES: dict[str, tuple[list[str], dict[str, int]]] = {}


def _string_tables(digest: str, table: Sequence[bytes | None]) -> tuple[list[str], dict[str, int]]:
    """(id -> token string, token string -> id) for a vocabulary, shared by all tokenizers that use it."""
    hit = _STRING_TABLES.get(digest)
    if hit is None:
        id_to_str = []
        for idx, tok in enumerate(table):
            if idx == 0:
                id_to_str.append(EOS_TOKEN)
            elif tok is None:
                id_to_str.append(_reserved_name(idx))
            else:
                id_to_str.append("".join(_BYTE_TO_CHAR[b] for b in tok))
        str_to_id = {s: i for i, s in enumerate(id_to_str)}
        if len(str_to_id) != VOCAB_SIZE:
            raise ValueError("a token's string form collides with a reserved name")
        with _CACHE_LOCK:
            hit = _STRING_TABLES.setdefault(digest, (id_to_str, str_to_id))
    return hit


class _Runtime:
    """A tokenizer's caches (its encoder, decode tables, added-token patterns), rebuilt on demand. It pickles as
    empty, so a pickled tokenizer - and datasets' fingerprint of it - does not depend on what it was used for."""

    __slots__ = ("encoder", "encoder_name", "decode_key", "dec_full", "dec_skip", "added_patterns")

    def __init__(self):
        self.encoder = self.encoder_name = self.decode_key = self.dec_full = self.dec_skip = None
        self.added_patterns: dict = {}

    def __reduce__(self):
        return (_Runtime, ())


# ----------------------------------------------------------------------------------------------------------------
# The transformers tokenizer
# ----------------------------------------------------------------------------------------------------------------


class RWKVWorldTokenizer(PreTrainedTokenizer):
    """RWKV World tokenizer (65536 ids) for transformers' Python tokenizer backend.

    Args:
        vocab_file: the vocabulary file; defaults to the copy shipped with rwkv_peft.
        errors: how ``decode`` treats bytes that are not valid UTF-8 (``"replace"``: U+FFFD; ``"strict"`` raises;
            ``"ignore"`` drops them; ``"backslashreplace"`` shows them as ``\\xNN``).
        append_eos: add id 0 after each sequence when ``add_special_tokens=True`` (default False: nothing is added).
        encoder_backend: ``"auto"`` (the compiled ``pyrwkv_tokenizer`` when usable, else pure Python), ``"pyrwkv"``
            (fail if unusable) or ``"python"``. Default: environment variable ``RWKV_PEFT_TOKENIZER_BACKEND`` or
            ``"auto"``. Not saved with the tokenizer.
        eos_token / pad_token / bos_token: all ``"<|endoftext|>"`` = id 0 by default. ``bos_token`` is only there
            so that ``generate`` can start from nothing; it is never prepended.
        split_special_tokens: default True - text is always encoded byte for byte, like the official tokenizer.
        chat_template: default: the named templates of :mod:`rwkv_peft.tokenization.chat_templates`
            (``{"default": rwkv, "rwkv": ..., "g1": ...}``); a saved tokenizer loads back the templates it was saved
            with. ``apply_chat_template`` tokenizes the rendered text piece by piece (see its docstring).
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        errors: str = "replace",
        append_eos: bool = False,
        encoder_backend: str | None = None,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        bos_token: str = EOS_TOKEN,
        unk_token: str | None = None,
        split_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        self.vocab_file = os.fspath(vocab_file) if vocab_file is not None else DEFAULT_VOCAB_FILE
        self.errors = errors
        self.append_eos = bool(append_eos)
        codecs.lookup_error(errors)  # fail early on an unknown error handler
        choice = encoder_backend or os.environ.get(BACKEND_ENV) or "auto"
        if choice not in ("auto", "pyrwkv", "python"):
            raise ValueError(
                f"encoder_backend (or ${BACKEND_ENV}) must be 'auto', 'pyrwkv' or 'python', got {choice!r}"
            )
        self._backend_choice = choice
        self._setup_tables(*_load_vocab_with_hash(self.vocab_file))
        if kwargs.get("chat_template") is None:  # a tokenizer saved with templates passes its own here
            kwargs["chat_template"] = default_chat_templates()
        super().__init__(
            errors=errors,
            append_eos=self.append_eos,
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            unk_token=unk_token,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # -- set-up -----------------------------------------------------------------------------------------------------
    def _setup_tables(self, table: tuple[bytes | None, ...], digest: str) -> None:
        self._table = table
        self._digest = digest
        self._vocab_key = digest  # backends are shared by every tokenizer with the same vocabulary content
        self._rt = _Runtime()
        try:
            _string_tables(digest, table)  # built (and checked) now rather than on first use
        except ValueError as exc:
            raise ValueError(f"RWKV World vocabulary file {self.vocab_file!r}: {exc}") from None

    @property
    def _id_to_str(self) -> list[str]:
        return _string_tables(self._digest, self._table)[0]

    @property
    def _str_to_id(self) -> dict[str, int]:
        return _string_tables(self._digest, self._table)[1]

    def _decode_tables(self) -> tuple[list, list]:
        """id -> bytes for decode (full, and with special ids skipped): vocabulary bytes, special/added tokens as
        their text, unused ids as b''. Rebuilt when the added tokens change."""
        rt = self._rt
        added = self._added_tokens_decoder
        specials = tuple(sorted(set(self.all_special_ids)))
        key = (tuple((i, t.content) for i, t in sorted(added.items())), specials)
        if key != rt.decode_key:
            size = max([VOCAB_SIZE - 1, *added.keys()]) + 1
            full = [t if t is not None else b"" for t in self._table] + [b""] * (size - VOCAB_SIZE)
            for idx, tok in added.items():
                full[idx] = tok.content.encode("utf-8")
            skip = list(full)
            for idx in specials:
                if 0 <= idx < size:
                    skip[idx] = b""
            guard = [None] * size  # see decode_bytes
            rt.dec_full, rt.dec_skip, rt.decode_key = full + guard, skip + guard, key
        return rt.dec_full, rt.dec_skip

    def _encoder(self):
        rt = self._rt
        if rt.encoder is None:
            enc, name = None, "python"
            if self._backend_choice in ("auto", "pyrwkv"):
                enc = _pyrwkv_encoder(self._vocab_key, self.vocab_file, self._table, self._digest)
                if enc is None and self._backend_choice == "pyrwkv":
                    raise RuntimeError(
                        "encoder_backend='pyrwkv' was asked for, but pyrwkv_tokenizer is not installed, the "
                        f"vocabulary {self.vocab_file!r} is not the official v20230424 one, or its self-check failed"
                    )
                name = "pyrwkv" if enc is not None else "python"
            if enc is None:
                enc = _python_encoder(self._vocab_key, self._table)
            rt.encoder, rt.encoder_name = enc, name
        return rt.encoder

    @property
    def encoder_backend(self) -> str:
        """The encoder in use: ``"pyrwkv"`` or ``"python"``."""
        self._encoder()
        return self._rt.encoder_name

    # -- vocabulary -------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._str_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._str_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < VOCAB_SIZE:
            raise ValueError(f"token id {index} is outside the RWKV World vocabulary (0..{VOCAB_SIZE - 1})")
        return self._id_to_str[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for tok in tokens:
            idx = self._added_tokens_encoder.get(tok)
            if idx is not None:
                data += self._added_tokens_decoder[idx].content.encode("utf-8")
                continue
            idx = self._str_to_id.get(tok)
            if idx is not None and self._table[idx] is not None:
                data += self._table[idx]
            elif idx is None:
                data += bytes(_CHAR_TO_BYTE[c] for c in tok)
        return data.decode("utf-8", self.errors)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        id_to_str = self._id_to_str
        return [id_to_str[i] for i in self._encode_plain(text)]

    # -- encoding ---------------------------------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with no special-token handling (the official tokenizer's result)."""
        enc = self._encoder()
        if self._rt.encoder_name == "pyrwkv":
            try:
                try:
                    return enc.encode(text)
                except UnicodeEncodeError:  # lone surrogates
                    return enc.encode(_clean_surrogates(text))
            except BaseException as exc:  # a Rust panic is a BaseException (pyo3's PanicException)
                if isinstance(exc, _NOT_RECOVERABLE):
                    raise
            return _python_encoder(self._vocab_key, self._table).encode(text)
        return enc.encode(text)

    def _encode_plain_batch(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self._encoder()
        if self._rt.encoder_name == "pyrwkv":
            texts = texts if isinstance(texts, list) else list(texts)
            try:
                try:
                    return enc.encode_batch(texts)
                except UnicodeEncodeError:  # lone surrogates
                    return enc.encode_batch([_clean_surrogates(t) for t in texts])
            except BaseException as exc:
                if isinstance(exc, _NOT_RECOVERABLE):
                    raise
            return _python_encoder(self._vocab_key, self._table).encode_batch(texts)
        return enc.encode_batch(texts)

    def _added_token_pattern(self, split_special_tokens: bool):
        if split_special_tokens or not self._added_tokens_encoder:
            return None
        names = tuple(sorted(self._added_tokens_encoder, key=lambda s: (-len(s), s)))
        cache = self._rt.added_patterns
        pat = cache.get(names)
        if pat is None:
            pat = cache[names] = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        return pat

    def _text_to_ids(self, text: str, split_special_tokens: bool) -> list[int]:
        pat = self._added_token_pattern(split_special_tokens)
        if pat is None:
            return self._encode_plain(text)
        parts = pat.split(text)
        out: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                out.append(self._added_tokens_encoder[part])
            elif part:
                out.extend(self._encode_plain(part))
        return out

    def _texts_to_ids(self, texts: Sequence[str], split_special_tokens: bool) -> list[list[int]]:
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text #{k} of the batch is {type(t).__name__}, expected str")
        if self._added_token_pattern(split_special_tokens) is None:
            return self._encode_plain_batch(texts)
        return [self._text_to_ids(t, split_special_tokens) for t in texts]

    def encode_batch(
        self, texts: Sequence[str], append_eos: bool | None = None, split_special_tokens: bool | None = None
    ) -> list[list[int]]:
        """Fast batch encoding to lists of ids (no padding, no attention masks): the path for
        ``datasets.map(batched=True)``. ``append_eos`` defaults to the tokenizer's setting."""
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        ids = self._texts_to_ids(texts, split)
        if self.append_eos if append_eos is None else append_eos:
            eos = self.eos_token_id
            for row in ids:
                row.append(eos)
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of raw bytes (invalid UTF-8 allowed), exactly as the official ``encodeBytes``; pure-Python path."""
        return _python_encoder(self._vocab_key, self._table).encode_bytes(data)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        eos = [self.eos_token_id] if self.append_eos else []
        if token_ids_1 is None:
            return token_ids_0 + eos
        return token_ids_0 + eos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list, token_ids_1: list | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        eos = [1] if self.append_eos else []
        mask = [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def _encode_plus(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors=None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError(
                "return_offsets_mapping is not available for RWKVWorldTokenizer (a Python tokenizer); "
                "tokens are byte strings, see docs/tokenizer.md"
            )
        split = kwargs.pop("split_special_tokens", None)
        split = self.split_special_tokens if split is None else split
        common = dict(
            add_special_tokens=add_special_tokens,
            padding_strategy=padding_strategy,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            stride=stride,
            is_split_into_words=is_split_into_words,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_length=return_length,
            verbose=verbose,
        )
        prep = dict(
            add_special_tokens=add_special_tokens,
            truncation=truncation_strategy.value,
            max_length=max_length,
            stride=stride,
            return_token_type_ids=return_token_type_ids,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_length=return_length,
            verbose=verbose,
        )
        simple = not is_split_into_words and not kwargs.get("sanitize_control_tokens")

        # One string (optionally with a string pair)
        if simple and isinstance(text, str) and (text_pair is None or isinstance(text_pair, str)):
            ids = self._text_to_ids(text, split)
            pair = self._text_to_ids(text_pair, split) if text_pair is not None else None
            return self.prepare_for_model(
                ids,
                pair_ids=pair,
                padding=padding_strategy.value,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                prepend_batch_axis=True,
                return_attention_mask=return_attention_mask,
                **prep,
            )

        # A batch of strings (optionally with a batch of string pairs)
        if (
            simple
            and isinstance(text, (list, tuple))
            and text
            and all(isinstance(t, str) for t in text)
            and (
                text_pair is None
                or (
                    isinstance(text_pair, (list, tuple))
                    and len(text_pair) == len(text)
                    and all(isinstance(t, str) for t in text_pair)
                )
            )
        ):
            ids = self._texts_to_ids(text, split)
            pairs = self._texts_to_ids(text_pair, split) if text_pair is not None else [None] * len(ids)
            plain = (
                text_pair is None
                and not (add_special_tokens and self.append_eos)
                and truncation_strategy == TruncationStrategy.DO_NOT_TRUNCATE
                and not return_token_type_ids
                and not return_special_tokens_mask
                and not return_overflowing_tokens
                and not return_length
            )
            if plain:
                batch: dict[str, list] = {"input_ids": ids}
                if verbose and self.model_max_length < VERY_LARGE_INTEGER:
                    for row in ids:
                        self._eventual_warn_about_too_long_sequence(row, max_length, verbose)
                if padding_strategy == PaddingStrategy.DO_NOT_PAD:  # pad() would only add the masks, slowly
                    if return_attention_mask or (
                        return_attention_mask is None and "attention_mask" in self.model_input_names
                    ):
                        batch["attention_mask"] = [[1] * len(row) for row in ids]
                    return BatchEncoding(batch, tensor_type=return_tensors)
            else:
                batch = {}
                for first, second in zip(ids, pairs):
                    out = self.prepare_for_model(
                        first,
                        pair_ids=second,
                        padding=PaddingStrategy.DO_NOT_PAD.value,
                        return_attention_mask=False,
                        return_tensors=None,
                        prepend_batch_axis=False,
                        **prep,
                    )
                    for key, value in out.items():
                        batch.setdefault(key, []).append(value)
                if return_tensors and return_overflowing_tokens:
                    batch.pop("overflowing_tokens", None)
                    batch.pop("num_truncated_tokens", None)
            batch = self.pad(
                batch,
                padding=padding_strategy.value,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask,
            )
            return BatchEncoding(batch, tensor_type=return_tensors)

        # Everything else (ids, pre-tokenized words, pairs given as tuples, chat sanitising) goes the generic way;
        # strings met there come back here one by one.
        kwargs["split_special_tokens"] = split
        return super()._encode_plus(text, text_pair=text_pair, **common, **kwargs)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        split = kwargs.pop("split_special_tokens", None)
        split = self.split_special_tokens if split is None else split
        kwargs.pop("add_special_tokens", None)
        pair = kwargs.pop("pair", None)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        ids = self._text_to_ids(text, split)
        if pair is not None:
            ids = ids + self._text_to_ids(pair, split)
        return self.convert_ids_to_tokens(ids)

    # -- chat templates ---------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation,
        tools: list | None = None,
        documents: list | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str | PaddingStrategy = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors=None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict | None = None,
        **kwargs,
    ):
        """transformers' ``apply_chat_template``, with the text tokenized piece by piece.

        ``tokenize=False`` is transformers' own method. With ``tokenize=True`` the conversation is rendered by
        :func:`~rwkv_peft.tokenization.chat_templates.render_segments` (transformers' renderer, plus the segment
        marks of our templates) and each piece is encoded on its own: the ids are the ones ``rwkv_peft``'s data
        formats train on, a ``{% generation %}`` edge never falls inside a token, and ``assistant_masks``
        (``return_assistant_tokens_mask=True``) is 1 exactly on the tokens of the generation blocks. transformers'
        own version reads token offsets from a fast tokenizer's ``encodings``, which a Python tokenizer does not
        have, so it cannot build the mask for this class.

        Supported as in transformers: single and batched conversations, ``tools``, ``documents``, named templates
        (``chat_template="g1"``), template keyword arguments (``enable_thinking=False``, ``train_think=False``,
        ``user_name="Q"``, ...), ``add_generation_prompt``, ``continue_final_message``, ``padding``,
        ``truncation`` / ``max_length`` (on the side ``truncation_side`` names), ``return_tensors``, ``return_dict``
        and ``tokenizer_kwargs`` with ``return_attention_mask``, ``padding_side``, ``pad_to_multiple_of`` or
        ``split_special_tokens``. ``sanitize_control_tokens=True`` encodes every piece as plain text (with the default
        ``split_special_tokens=True`` nothing in the text is ever read as a control token anyway).
        """
        if not tokenize:
            return super().apply_chat_template(
                conversation,
                tools=tools,
                documents=documents,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **kwargs,
            )
        if return_assistant_tokens_mask and not return_dict:
            raise ValueError("`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        sanitize = bool(kwargs.pop("sanitize_control_tokens", False))
        options = dict(tokenizer_kwargs or {})
        return_attention_mask = options.pop("return_attention_mask", None)
        padding_side = options.pop("padding_side", None)
        pad_to_multiple_of = options.pop("pad_to_multiple_of", None)
        split = options.pop("split_special_tokens", None)
        options.pop("add_special_tokens", None)  # a chat template writes everything itself
        if options:
            raise TypeError(
                f"apply_chat_template: tokenizer_kwargs {sorted(options)} are not supported by RWKVWorldTokenizer "
                "(supported: return_attention_mask, padding_side, pad_to_multiple_of, split_special_tokens)"
            )
        split = True if sanitize else (self.split_special_tokens if split is None else split)

        source = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        conversations = list(conversation) if batched else [conversation]
        template_kwargs = {**self.special_tokens_map, **kwargs}

        all_ids: list[list[int]] = []
        all_masks: list[list[int]] = []
        for chat in conversations:
            messages = chat.messages if hasattr(chat, "messages") else chat
            messages = [
                {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages
            ]
            segments = render_segments(
                messages,
                source,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **template_kwargs,
            )
            ids: list[int] = []
            mask: list[int] = []
            for text, trained in segments:
                piece = self._text_to_ids(text, split)
                ids += piece
                mask += [int(trained)] * len(piece)
            all_ids.append(ids)
            all_masks.append(mask)

        if truncation not in (False, None, "do_not_truncate", TruncationStrategy.DO_NOT_TRUNCATE):
            limit = max_length if max_length is not None else self.model_max_length
            for k, (ids, mask) in enumerate(zip(all_ids, all_masks)):
                if len(ids) > limit:
                    cut = slice(len(ids) - limit, None) if self.truncation_side == "left" else slice(0, limit)
                    all_ids[k], all_masks[k] = ids[cut], mask[cut]

        out = self.pad(
            {"input_ids": all_ids},
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        data = dict(out)
        if return_assistant_tokens_mask:
            side = padding_side or self.padding_side
            masks = []
            for row, mask in zip(data["input_ids"], all_masks):
                extra = [0] * (len(row) - len(mask))
                masks.append(extra + mask if side == "left" else mask + extra)
            data["assistant_masks"] = masks
        if not batched and not return_tensors:
            data = {key: value[0] for key, value in data.items()}
        encoded = BatchEncoding(data, tensor_type=return_tensors)
        return encoded if return_dict else encoded["input_ids"]

    # -- decoding ---------------------------------------------------------------------------------------------------
    def decode_bytes(self, token_ids, skip_special_tokens: bool = False) -> bytes:
        """The bytes behind ``token_ids`` (special/added tokens as their UTF-8 text, unused ids as nothing)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        elif hasattr(token_ids, "tolist"):  # tensors and arrays
            token_ids = token_ids.tolist()
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
        full, skip = self._decode_tables()
        table = skip if skip_special_tokens else full
        try:
            # The tables end with one None per id, so an id past the end meets a None (or the end) and the join
            # fails instead of giving wrong text; negative ids, which Python would count from the end, are caught
            # by the min().
            if token_ids and min(token_ids) < 0:
                raise IndexError
            return b"".join(map(table.__getitem__, token_ids))
        except (TypeError, IndexError):
            size = len(table) // 2
            for t in token_ids:
                if not isinstance(t, int) and not hasattr(t, "__index__"):
                    raise TypeError(f"token ids must be integers, got {t!r}") from None
                if not 0 <= t < size:
                    raise ValueError(f"token id {t} is outside the tokenizer's ids (0..{size - 1})") from None
            raise

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs):
        # A flat list of ints skips the base class's element-by-element conversion (most of decode's time).
        if isinstance(token_ids, int) or (
            isinstance(token_ids, list) and (not token_ids or isinstance(token_ids[0], int))
        ):
            return self._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        errors = kwargs.pop("errors", None) or self.errors
        text = self.decode_bytes(token_ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors)
        if clean_up_tokenization_spaces:  # off by default: it would change the text
            text = self.clean_up_tokenization(text)
        return text

    def stream_decoder(self, skip_special_tokens: bool = False, errors: str | None = None) -> WorldStreamDecoder:
        """A decoder for generation: ``put(ids)`` returns only the text completed so far, holding back the bytes of
        a character that is not finished yet; ``end()`` flushes what remains."""
        return WorldStreamDecoder(self, skip_special_tokens=skip_special_tokens, errors=errors)

    # -- saving -----------------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary: {save_directory!r} is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME
        target = os.path.join(save_directory, name)
        if os.path.exists(target) and os.path.realpath(target) == os.path.realpath(self.vocab_file):
            return (target,)
        with open(self.vocab_file, "rb") as f:
            raw = f.read()
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, target)
        return (target,)


class WorldStreamDecoder:
    """Incremental decoding for generation (see :meth:`RWKVWorldTokenizer.stream_decoder`)."""

    def __init__(self, tokenizer: RWKVWorldTokenizer, skip_special_tokens: bool = False, errors: str | None = None):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors or tokenizer.errors)

    def put(self, token_ids) -> str:
        """Feed one id or a sequence of ids; returns the newly completed text (possibly "")."""
        data = self._tokenizer.decode_bytes(token_ids, skip_special_tokens=self._skip)
        return self._decoder.decode(data, final=False)

    def end(self) -> str:
        """Flush: an unfinished character at the end becomes U+FFFD (with errors='replace')."""
        return self._decoder.decode(b"", final=True)

    def reset(self) -> None:
        self._decoder.reset()
