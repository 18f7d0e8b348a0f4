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
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "message 1: role 'robot' is not one of .*tool"),
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


def test_chat_g1_template_think_and_train_think(tok):
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "Add.\n\nTwo and two."},
                        {"role": "user", "content": "3+3?"},
                        {"role": "assistant", "content": "<think>Three\n\nand three.</think> 6"},
                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    text = ("User: 2+2?\n\nAssistant: <think>\nAdd.\nTwo and two.\n</think>\n4\n\n"
            "User: 3+3?\n\nAssistant: <think>\nThree\nand three.\n</think>\n6\n\n"
            "User: Hi\n\nAssistant: <think>\n</think>\nHello.\n\n")
    think = tokenize_row(row, cfg(format="chat", add_eos=False, template={"name": "g1"}), tok)
    assert tok.decode(think["input_ids"]) == text
    assert trained_text(tok, think) == (" <think>\nAdd.\nTwo and two.\n</think>\n4\n\n|"
                                        " <think>\nThree\nand three.\n</think>\n6\n\n| <think>\n</think>\nHello.\n\n")
    answers = tokenize_row(row, cfg(format="chat", add_eos=False, template={"name": "g1", "train_think": False}), tok)
    assert answers["input_ids"] == think["input_ids"]
    assert trained_text(tok, answers) == "\n4\n\n|\n6\n\n|\nHello.\n\n"
    # the default rwkv template ignores reasoning fields
    plain = tokenize_row(row, cfg(format="chat", add_eos=False), tok)
    assert tok.decode(plain["input_ids"]).startswith("User: 2+2?\n\nAssistant: 4\n\nUser: 3+3?\n\nAssistant: <think>")


def test_chat_tools_and_tool_results(tok):
    row = {"tools": '[{"type": "function", "function": {"name": "now", "description": "The time", '
                    '"parameters": {"type": "object", "properties": {}}}}]',
           "messages": [{"role": "user", "content": "Time?"},
                        {"role": "assistant", "content": None,
                         "tool_calls": '[{"function": {"name": "now", "arguments": "{}"}}]'},
                        {"role": "tool", "content": "12:00"},
                        {"role": "assistant", "content": "Noon."}]}
    out = tokenize_row(row, cfg(format="chat", add_eos=False), tok)
    assert tok.decode(out["input_ids"]) == (
        'System: Tools:\n[\n{"name":"now","description":"The time","arguments":{}}\n]\nReturn only a JSON function '
        'call.\n\nUser: Time?\n\nAssistant: ```json\n{"name":"now","arguments":{}}\n```\n\n'
        "User: Function output:\n12:00\n\nAssistant: Noon.\n\n")
    assert trained_text(tok, out) == ' ```json\n{"name":"now","arguments":{}}\n```\n\n| Noon.\n\n'


def test_persona_with_g1_template(tok):
    row = {"persona": "A cat.",
           "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Mew."}]}
    out = tokenize_row(row, cfg(format="persona", add_eos=False, template={"name": "g1", "train_think": False}), tok)
    assert tok.decode(out["input_ids"]) == "System: A cat.\n\nUser: Hi\n\nAssistant: <think>\n</think>\nMew.\n\n"
    assert trained_text(tok, out) == "\nMew.\n\n"


def test_chat_template_cleans_text_as_the_instruction_format_does():
    """The chat templates (Jinja) and the instruction format (Python) write a turn's text the same way."""
    import random

    chars = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\u3000",
             "\ufeff", "a", "b", "\u00e9", "<"]
    rng = random.Random(0)
    for collapse in (True, False):
        c = cfg(format="chat", template={"collapse_blank_lines": collapse, "role_separator": " -> "})
        i = cfg(format="instruction", template={"collapse_blank_lines": collapse, "role_separator": " -> "})
        for _ in range(150):
            s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 12))) + "x"
            chat = render_segments({"messages": [{"role": "assistant", "content": s}]}, c)
            inst = render_segments({"instruction": "q", "output": s}, i)
            assert chat[-1] == inst[-1] and chat[-2] == ("Assistant ->", False)


@pytest.mark.parametrize("row,msg", [
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]},
     "tool call 1 has no name"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": "{bad"}]},
     "'tool_calls' is text that is not JSON"),
    ({"messages": [{"role": "assistant", "content": "x"}], "tools": {"name": "f"}}, "'tools' should be a list"),
    ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": 3}]},
     "'reasoning_content' should be text"),
    ({"messages": [{"role": "tool", "content": None}]}, "message 1: 'content' should be text"),
])
def test_malformed_chat_extras(tok, row, msg):
    with pytest.raises(RowError, match=msg):
        tokenize_row(row, cfg(format="chat", template={"name": "g1"}), tok)


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
