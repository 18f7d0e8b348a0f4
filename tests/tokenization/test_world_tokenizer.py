"""RWKV World tokenizer: exact parity with the official rwkv package, decoding, saving, batching, both backends."""

import importlib.util
import json
import os
import pickle
import random
from pathlib import Path

import pytest

from rwkv_peft.tokenization import RWKVWorldTokenizer, load_world_vocab
from rwkv_peft.tokenization.tokenization_rwkv_world import DEFAULT_VOCAB_FILE, GreedyByteEncoder

HAVE_PYRWKV = importlib.util.find_spec("pyrwkv_tokenizer") is not None

EDGE_CASES = [
    "",
    "a",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文分词测试：今天天气很好，我们去公园散步。",
    "日本語のテキスト、カタカナとひらがな。한국어 텍스트.",
    "emoji 😀🎉👍🏽 ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0354\u0355 ﬁ ñ vs n\u0303",
    " " * 1000,
    "\t" * 300 + "\n" * 300 + " \t \n" * 50,
    "line one\r\nline two\r\n\r\n\r\n",
    "\x00",
    "a\x00b\x00\x00c" + "\x00" * 500,
    "".join(chr(i) for i in range(256)),
    "<|endoftext|>",
    "\ufeffBOM and \u200b zero width \u2028 line sep \u2029 para sep \x85 NEL",
    "\U0001f600" * 200 + "\U0010ffff\U000e0001\uffff\ufffd",
    "-" * 500 + "#" * 333 + "=" * 100,
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n",
]

WORDS = "the of and to in is was for that on with as by at from it an were are which this be".split()


def mixed_text(nbytes, seed=0):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < nbytes:
        k = rng.random()
        if k < 0.55:
            s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + rng.choice([". ", ".\n", "? "])
        elif k < 0.72:
            s = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(3, 40))) + "。"
        elif k < 0.77:
            emoji = ["😀", "👍🏽", "👨‍👩‍👧", "🚀"]
            s = "".join(rng.choice(emoji) for _ in range(rng.randint(1, 4)))
        elif k < 0.9:
            s = f"def f_{rng.randint(0, 999)}(x):\n\treturn x * {rng.randint(0, 99)}\r\n"
        else:
            s = rng.choice([" ", "\n", "\t", "\r\n", "\x00"]) * rng.randint(1, 150)
        parts.append(s)
        size += len(s.encode("utf-8"))
    return "".join(parts)


def random_unicode(rng, max_len=60):
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(rng.randint(0, max_len)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def official():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    import rwkv

    return rwkv_tokenizer.TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def tok():
    return RWKVWorldTokenizer()  # "auto": pyrwkv when installed


@pytest.fixture(scope="module")
def tok_py():
    t = RWKVWorldTokenizer(encoder_backend="python")
    assert t.encoder_backend == "python"
    return t


@pytest.fixture(scope="module", params=["auto", "python"])
def any_tok(request, tok, tok_py):
    return tok if request.param == "auto" else tok_py


@pytest.fixture(scope="module")
def megabyte():
    return mixed_text(1_000_000, seed=3)


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary and special tokens
# ----------------------------------------------------------------------------------------------------------------


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 65536
    assert len(tok) == 65536
    assert len(tok.get_vocab()) == 65536
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0 and tok.bos_token_id == 0
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    table = load_world_vocab()
    assert len(table) == 65536 and table[0] is None and table[65530] is None
    assert sum(t is not None for t in table) == 65529
    assert table[1] == b"\x00" and table[65529] == b" " * 128


def test_pyrwkv_chosen_when_installed(tok):
    assert tok.encoder_backend == ("pyrwkv" if HAVE_PYRWKV else "python")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("RWKV_PEFT_TOKENIZER_BACKEND", "python")
    assert RWKVWorldTokenizer().encoder_backend == "python"
    monkeypatch.setenv("RWKV_PEFT_TOKENIZER_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RWKV_PEFT_TOKENIZER_BACKEND"):
        RWKVWorldTokenizer()


# ----------------------------------------------------------------------------------------------------------------
# Exactness against the official tokenizer
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_match_official(any_tok, official, text):
    ids = official.encode(text)
    assert any_tok.encode(text) == ids
    assert any_tok(text)["input_ids"] == ids
    assert any_tok.encode_batch([text, text]) == [ids, ids]
    assert any_tok.decode(ids) == text


def test_random_unicode_matches_official(any_tok, official):
    rng = random.Random(1234)
    texts = [random_unicode(rng) for _ in range(400)]
    expected = [official.encode(t) for t in texts]
    assert [any_tok.encode(t) for t in texts] == expected
    assert any_tok.encode_batch(texts) == expected
    assert [any_tok.decode(ids) for ids in expected] == texts


def test_random_byte_level_texts_match_official(any_tok, official):
    rng = random.Random(99)
    table = load_world_vocab()
    utf8_tokens = []
    for t in table:
        if t is not None:
            try:
                utf8_tokens.append(t.decode("utf-8"))
            except UnicodeDecodeError:
                pass
    texts = []
    for _ in range(150):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        texts.append(raw.decode("latin-1"))  # every byte value as a code point
        texts.append(raw.decode("utf-8", "replace"))
        texts.append("".join(rng.choice(utf8_tokens) for _ in range(rng.randint(1, 40))))  # token seams
    expected = [official.encode(t) for t in texts]
    assert any_tok.encode_batch(texts) == expected
    assert [any_tok.decode(ids) for ids in expected] == texts


def test_raw_bytes_including_invalid_utf8(tok, official):
    rng = random.Random(7)
    for _ in range(200):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        ids = official.encodeBytes(raw)
        assert tok.encode_bytes(raw) == ids
        assert tok.decode_bytes(ids) == raw


def test_megabyte_matches_official(any_tok, official, megabyte):
    ids = official.encode(megabyte)
    assert any_tok.encode(megabyte) == ids
    assert any_tok(megabyte)["input_ids"] == ids
    assert any_tok.decode(ids) == megabyte


def test_backends_agree(tok, tok_py, megabyte):
    docs = [megabyte[i : i + 997] for i in range(0, 200_000, 997)]
    assert tok.encode_batch(docs) == tok_py.encode_batch(docs)
    assert tok(docs)["input_ids"] == tok_py(docs)["input_ids"]
    assert tok_py.encode_batch(docs) == [tok_py.encode(d) for d in docs]
    # a fresh pure-Python encoder (empty memo) gives the same as a used one
    fresh = GreedyByteEncoder(load_world_vocab())
    assert fresh.encode(megabyte[:300_000]) == tok.encode(megabyte[:300_000])


# ----------------------------------------------------------------------------------------------------------------
# Dirty data: surrogates, invalid UTF-8, streaming
# ----------------------------------------------------------------------------------------------------------------


def test_lone_surrogates_encode_as_replacement_char(any_tok, official):
    with pytest.raises(UnicodeEncodeError):
        official.encode("a\ud800b")  # the official tokenizer cannot encode them
    assert any_tok.encode("a\ud800b") == official.encode("a\ufffdb")
    assert any_tok.encode("\udfff") == official.encode("\ufffd")
    # a pair written as two code points is the character it stands for
    assert any_tok.encode("x\ud83d\ude00y") == official.encode("x😀y")
    expected = [official.encode("ok"), official.encode("bad \ufffd text")]
    assert any_tok.encode_batch(["ok", "bad \udc80 text"]) == expected
    assert any_tok(["\ud800", "fine"], padding=True)["input_ids"][0][:3] == official.encode("\ufffd")


def test_decode_partial_character_does_not_raise(tok, official):
    ids = official.encode("😀")
    assert len(ids) > 1  # split across byte tokens
    partial = ids[:-1]
    assert tok.decode(partial) == "\ufffd"
    assert tok.decode(partial, errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        tok.decode(partial, errors="strict")
    assert tok.decode_bytes(partial) == "😀".encode("utf-8")[: len(tok.decode_bytes(partial))]
    lone = official.encodeBytes(b"\xff")
    assert tok.decode(lone) == "\ufffd"


def test_stream_decoder_holds_back_incomplete_characters(tok):
    text = "中文😀 ok é👨‍👩‍👧"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.put(i) for i in ids]
    assert "".join(pieces) + stream.end() == text
    assert "\ufffd" not in "".join(pieces)
    # ending in the middle of a character flushes one replacement character
    stream = tok.stream_decoder()
    cut = tok.encode("😀")[:-1]
    assert stream.put(cut) == ""
    assert stream.end() == "\ufffd"
    # special ids
    stream = tok.stream_decoder(skip_special_tokens=True)
    assert stream.put([0] + tok.encode("hi") + [0]) == "hi"


def test_decode_ids_outside_vocab(tok):
    assert tok.decode([65530, 65535]) == ""  # unused ids decode to nothing
    assert tok.decode([0]) == "<|endoftext|>"
    assert tok.decode([0] + tok.encode("x"), skip_special_tokens=True) == "x"
    for bad in ([-100], [65536], [2**40]):
        with pytest.raises(ValueError, match="outside"):
            tok.decode(bad)


def test_decode_accepts_tensors_and_batches(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor text")
    assert tok.decode(torch.tensor(ids)) == "tensor text"
    assert tok.batch_decode(torch.tensor([ids, ids])) == ["tensor text"] * 2
    assert tok.decode([ids, ids]) == ["tensor text"] * 2


# ----------------------------------------------------------------------------------------------------------------
# transformers behaviour
# ----------------------------------------------------------------------------------------------------------------


def test_no_bos_and_eos_only_when_asked(tok, official):
    ids = official.encode("hello")
    assert tok("hello")["input_ids"] == ids
    assert tok("hello", add_special_tokens=True)["input_ids"] == ids
    assert tok.encode("hello") == ids
    eos_tok = RWKVWorldTokenizer(append_eos=True)
    assert eos_tok("hello")["input_ids"] == ids + [0]
    assert eos_tok("hello", add_special_tokens=False)["input_ids"] == ids
    assert eos_tok(["hello", "hi"])["input_ids"] == [ids + [0], official.encode("hi") + [0]]
    assert eos_tok.encode_batch(["hello"]) == [ids + [0]]
    assert tok.encode_batch(["hello"], append_eos=True) == [ids + [0]]


def test_special_token_text_is_plain_text_by_default(tok, official):
    text = "a<|endoftext|>b"
    assert tok.encode(text) == official.encode(text)
    assert 0 not in tok.encode(text)
    assert tok.encode(text, split_special_tokens=False) == official.encode("a") + [0] + official.encode("b")
    recognising = RWKVWorldTokenizer(split_special_tokens=False)
    assert recognising(text)["input_ids"] == official.encode("a") + [0] + official.encode("b")
    assert recognising.decode(recognising.encode(text)) == text


def test_tokenize_and_token_strings(tok, official):
    text = "Hi 中文\r\n\x00 😀"
    tokens = tok.tokenize(text)
    assert tok.convert_tokens_to_ids(tokens) == official.encode(text)
    assert tok.convert_tokens_to_string(tokens) == text
    assert all(isinstance(t, str) and t for t in tokens)


def test_batch_padding_and_attention_mask(tok, official):
    pytest.importorskip("torch")
    texts = ["short", "a somewhat longer text, with 中文 and 😀", ""]
    out = tok(texts, padding=True, return_tensors="pt")
    lengths = [len(official.encode(t)) for t in texts]
    assert out["input_ids"].shape == (3, max(lengths))
    assert out["attention_mask"].sum(1).tolist() == lengths
    assert (out["input_ids"][out["attention_mask"] == 0] == 0).all()
    assert out["input_ids"][0, : lengths[0]].tolist() == official.encode(texts[0])
    left = tok(texts, padding="max_length", max_length=40, padding_side="left")
    assert all(len(row) == 40 for row in left["input_ids"])
    assert left["attention_mask"][0] == [0] * (40 - lengths[0]) + [1] * lengths[0]
    trunc = tok(texts, truncation=True, max_length=4)
    assert [len(r) for r in trunc["input_ids"]] == [min(4, n) for n in lengths]
    assert "token_type_ids" not in out


def test_pairs_and_pretokenized_inputs(tok, official):
    out = tok("first", "second")
    assert out["input_ids"] == official.encode("first") + official.encode("second")
    ids = official.encode("already ids")
    assert tok(ids)["input_ids"] == ids
    words = tok(["split", "words"], is_split_into_words=True)["input_ids"]
    assert words == official.encode("split") + official.encode("words")


def test_save_and_load_round_trip(tmp_path, official):
    t = RWKVWorldTokenizer(append_eos=True)
    t.add_tokens(["<|user|>"])
    files = t.save_pretrained(tmp_path)
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == Path(DEFAULT_VOCAB_FILE).read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "RWKVWorldTokenizer"
    assert config["append_eos"] is True and config["eos_token"] == "<|endoftext|>"
    assert any(str(f).endswith("tokenizer_config.json") for f in files)
    loaded = RWKVWorldTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_file == str(tmp_path / "rwkv_vocab_v20230424.txt")
    assert loaded.append_eos is True
    assert loaded.convert_tokens_to_ids("<|user|>") == 65536 and len(loaded) == 65537
    assert loaded("x y 中")["input_ids"] == official.encode("x y 中") + [0]
    assert loaded.encoder_backend == ("pyrwkv" if HAVE_PYRWKV else "python")
    loaded.save_pretrained(tmp_path)  # saving onto its own folder keeps the vocabulary intact
    assert RWKVWorldTokenizer.from_pretrained(tmp_path).encode("again") == official.encode("again") + [0]


def test_auto_tokenizer_with_registered_config(tmp_path, official):
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    class StandInRWKVConfig(PretrainedConfig):
        model_type = "rwkv_peft_tokenizer_test"

    AutoConfig.register(StandInRWKVConfig.model_type, StandInRWKVConfig, exist_ok=True)
    AutoTokenizer.register(StandInRWKVConfig, slow_tokenizer_class=RWKVWorldTokenizer, exist_ok=True)
    StandInRWKVConfig().save_pretrained(tmp_path)
    RWKVWorldTokenizer().save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(auto, RWKVWorldTokenizer)
    assert auto.encode("auto loaded 文本") == official.encode("auto loaded 文本")
    # without a tokenizer_config.json the registered config alone is enough
    (tmp_path / "tokenizer_config.json").unlink()
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), RWKVWorldTokenizer)


def test_bad_vocab_file_is_named(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n2 'bc' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt.*line 2.*2 bytes"):
        load_world_vocab(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        RWKVWorldTokenizer(vocab_file=str(tmp_path / "missing.txt"))


def test_pickle_and_stable_fingerprint(tok, official):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled 中文") == official.encode("pickled 中文")
    assert clone.encoder_backend == tok.encoder_backend
    datasets = pytest.importorskip("datasets")
    from datasets.fingerprint import Hasher

    fresh = RWKVWorldTokenizer()
    before = Hasher.hash(fresh)
    fresh(["warm the caches", "and the memo"], split_special_tokens=False)
    fresh.decode([1, 2, 3])
    assert Hasher.hash(fresh) == before
    assert datasets is not None


def test_datasets_map_batched(tok, official):
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i}: 中文 text 😀 " * (i % 5 + 1) for i in range(64)]
    ds = datasets.Dataset.from_dict({"text": texts})
    mapped = ds.map(lambda b: {"input_ids": tok.encode_batch(b["text"])}, batched=True, batch_size=16)
    assert mapped["input_ids"] == [official.encode(t) for t in texts]
    mapped = ds.map(lambda b: tok(b["text"]), batched=True, batch_size=16, remove_columns=["text"])
    assert mapped["input_ids"] == [official.encode(t) for t in texts]
    assert [sum(m) for m in mapped["attention_mask"]] == [len(official.encode(t)) for t in texts]


@pytest.mark.skipif(not HAVE_PYRWKV, reason="pyrwkv_tokenizer not installed")
def test_forcing_pyrwkv_and_its_known_limits():
    import pyrwkv_tokenizer

    t = RWKVWorldTokenizer(encoder_backend="pyrwkv")
    assert t.encoder_backend == "pyrwkv"
    raw = pyrwkv_tokenizer.RWKVTokenizer(vocab_filepath=DEFAULT_VOCAB_FILE)
    with pytest.raises(UnicodeEncodeError):
        raw.encode("\ud800")  # routed through the surrogate clean-up by the tokenizer class
    assert t.encode("\ud800") == t.encode("\ufffd")


def test_registered_with_rwkv_peft_if_available(tmp_path):
    """Once rwkv_peft registers RWKV7Config with AutoTokenizer, a model folder loads this tokenizer."""
    rwkv_peft = pytest.importorskip("rwkv_peft")
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    config_cls = getattr(rwkv_peft, "RWKV7Config", None)
    if config_cls is None or config_cls not in TOKENIZER_MAPPING:
        pytest.skip("rwkv_peft does not register a tokenizer for RWKV7Config (yet)")
    config_cls().save_pretrained(tmp_path)
    RWKVWorldTokenizer().save_pretrained(tmp_path)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), RWKVWorldTokenizer)


def test_compiled_encoder_failure_falls_back_to_python(official):
    """Should the compiled encoder ever fail (a Rust panic arrives as a BaseException), the Python encoder answers."""

    class Panic(BaseException):
        pass

    class Broken:
        def encode(self, text):
            raise Panic("boom")

        def encode_batch(self, texts):
            raise Panic("boom")

    t = RWKVWorldTokenizer()
    t._encoder()
    t._rt.encoder, t._rt.encoder_name = Broken(), "pyrwkv"
    assert t.encode("still exact 中文") == official.encode("still exact 中文")
    assert t.encode_batch(["a", "b c"]) == [official.encode("a"), official.encode("b c")]
    t._rt.encoder = type("Interrupted", (), {"encode": lambda self, text: (_ for _ in ()).throw(KeyboardInterrupt)})()
    with pytest.raises(KeyboardInterrupt):
        t.encode("x")
