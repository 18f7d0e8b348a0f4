"""Formats and templates: exact text and loss masks for text / instruction / chat / persona."""
import pytest

from rwkv_peft.data import IGNORE, render_segments, tokenize_row
from rwkv_peft.data.formats import RowError
from rwkv_peft.recipe import DataSection


def cfg(**kw):
    return DataSection(train="x", **kw)


def trained_text(tok, out):
    """The text of the trained tokens (each run of trained tokens decoded, joined with '|')."""
    runs, cur = [], []
    for i, l in zip(out["input_ids"], out["labels"]):
        if l != IGNORE:
            assert l == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return "|".join(tok.decode(r) for r in runs)


def test_text(tok):
    out = tokenize_row({"text": "Hello world"}, cfg(format="text"), tok)
    assert tok.decode(out["input_ids"]) == "Hello world<|endoftext|>"
    assert out["labels"] == out["input_ids"]
    out = tokenize_row({"text": "Hi"}, cfg(format="text", add_eos=False), tok)
    assert out["input_ids"] == tok.encode("Hi")


def test_chat_default_rwkv_template_and_assistant_mask(tok):
    row = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Bye\n\n\nnow"}, {"role": "assistant", "content": "Bye."}]}
    out = tokenize_row(row, cfg(format="chat"), tok)
    assert tok.decode(out["input_ids"]) == ("User: Hi there\n\nAssistant: Hello!\n\nUser: Bye\nnow\n\n"
                                            "Assistant: Bye.\n\n<|endoftext|>")
    assert trained_text(tok, out) == " Hello!\n\n| Bye.\n\n<|endoftext|>"
    all_out = tokenize_row(row, cfg(format="chat", loss_on="all"), tok)
    assert all(label != IGNORE for label in all_out["labels"])


def test_chat_configurable_template_and_sharegpt_fields(tok):
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    c = cfg(format="chat", add_eos=False,
            fields={"messages": "conversations", "role": "from", "content": "value"},
            template={"roles": {"user": "Q", "assistant": "A"}, "role_separator": " -> ", "turn_separator": "\n"})
    out = tokenize_row(row, c, tok)
    assert tok.decode(out["input_ids"]) == "Q -> a\nA -> b\n"
    assert trained_text(tok, out) == " b\n"


def test_instruction(tok):
    out = tokenize_row({"instruction": "Add", "input": "1 and 2", "output": "3"}, cfg(format="instruction"), tok)
    assert tok.decode(out["input_ids"]) == "Instruction: Add\n\nInput: 1 and 2\n\nResponse: 3\n\n<|endoftext|>"
    assert trained_text(tok, out) == " 3\n\n<|endoftext|>"
    out = tokenize_row({"instruction": "Say hi", "output": "hi"}, cfg(format="instruction", add_eos=False), tok)
    assert tok.decode(out["input_ids"]) == "Instruction: Say hi\n\nResponse: hi\n\n"


def test_persona(tok):
    row = {"persona": "You are a pirate.", "messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Arr!"}]}
    out = tokenize_row(row, cfg(format="persona", add_eos=False), tok)
    assert tok.decode(out["input_ids"]) == "System: You are a pirate.\n\nUser: Hi\n\nAssistant: Arr!\n\n"
    assert trained_text(tok, out) == " Arr!\n\n"
    # a tuned state carries the persona: no System turn
    out = tokenize_row(row, cfg(format="persona", add_eos=False, persona_in_prompt=False), tok)
    assert tok.decode(out["input_ids"]) == "User: Hi\n\nAssistant: Arr!\n\n"
    # rows without a persona use data.persona
    del row["persona"]
    out = tokenize_row(row, cfg(format="persona", add_eos=False, persona="A cat."), tok)
    assert tok.decode(out["input_ids"]).startswith("System: A cat.\n\n")


@pytest.mark.parametrize("fmt,row,msg", [
    ("text", {"body": "x"}, "missing field 'text'"),
    ("text", {"text": 3}, "should be text, found int"),
    ("text", {"text": "  "}, "is empty"),
    ("instruction", {"instruction": "x"}, "missing field 'output'"),
    ("chat", {"messages": []}, "non-empty list"),
    ("chat", {"messages": "not json"}, "not a JSON list"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "message 1: role 'robot'"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "message 1: 'content' should be text"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ("chat", {"messages": ["hi"]}, "message 1 should be a mapping"),
    ("persona", {"messages": [{"role": "assistant", "content": "x"}]}, "missing field 'persona'"),
])
def test_malformed_rows(tok, fmt, row, msg):
    with pytest.raises(RowError, match=msg):
        tokenize_row(row, cfg(format=fmt), tok)


def test_segments_split_after_the_role_name():
    segs = render_segments({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                           cfg(format="chat"))
    assert segs == [("User:", False), (" a\n\n", False), ("Assistant:", False), (" b\n\n", True)]


def test_world_tokenizer_chat():
    """The same rendering through the RWKV World tokenizer (id 0 = end of text)."""
    tokenization = pytest.importorskip("rwkv_peft.tokenization")
    tok = tokenization.RWKVWorldTokenizer()
    row = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    out = tokenize_row(row, cfg(format="chat"), tok, eos_id=0)
    assert tok.decode(out["input_ids"][:-1]) == "User: Hi there\n\nAssistant: Hello!\n\n"
    assert out["input_ids"][-1] == 0
    assert tok.decode([i for i, lab in zip(out["input_ids"][:-1], out["labels"][:-1]) if lab != IGNORE]) == \
        " Hello!\n\n"
