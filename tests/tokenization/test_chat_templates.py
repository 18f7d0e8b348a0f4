"""Chat templates on the RWKV World tokenizer: the rwkv and g1 formats, tools, assistant masks that equal what the
recipe's chat format trains, named templates, and saving/loading them with the tokenizer."""
import pytest

from rwkv_peft.data import IGNORE, tokenize_row
from rwkv_peft.recipe import DataSection, RecipeError, TemplateSection, recipe_from_text
from rwkv_peft.tokenization import RWKVWorldTokenizer
from rwkv_peft.tokenization.chat_templates import (CHAT_TEMPLATES, G1_TEMPLATE, RWKV_TEMPLATE,
                                                   default_chat_templates, has_generation_blocks, render_segments,
                                                   template_source)


@pytest.fixture(scope="module")
def tok():
    return RWKVWorldTokenizer()


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi\n\n\nthere"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

THINK = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2\n\nis 4."},
    {"role": "user", "content": "And 3+3?"},
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "It is 20 C."},
]
TOOL_TEXT = ('System: Tools:\n[\n{"name":"get_weather","description":"The weather now",'
             '"arguments":{"city":{"type":"string"}},"required":["city"]}\n]\nReturn only a JSON function call.\n\n'
             'User: Weather in Paris?\n\n'
             'Assistant: ```json\n{"name":"get_weather","arguments":{"city":"Paris"}}\n```\n\n'
             'User: Function output:\n{"temp": 20}\n\n'
             'Assistant: It is 20 C.\n\n')


def test_rwkv_template_system_multi_turn_and_generation_prompt(tok):
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "System: You are terse.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:"
    assert tok.apply_chat_template(CHAT[:3], tokenize=False) == \
        "System: You are terse.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\n"
    # the prompt ends in "Assistant:" and the trained part of a turn starts with the space the model generates
    assert render_segments(CHAT[1:3], "rwkv") == [("User:", False), (" Hi\nthere\n\n", False),
                                                  ("Assistant:", False), (" Hello!\n\n", True)]
    # the generation prompt is a prefix of the conversation with the answer, token for token
    prompt = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_dict=False)
    assert tok.apply_chat_template(CHAT[:3], return_dict=False)[:len(prompt)] == prompt


def test_g1_think_fake_think_and_no_think(tok):
    head = "User: What is 2+2?\n\nAssistant: <think>\n2 plus 2\nis 4.\n</think>\n4\n\nUser: And 3+3?\n\n"
    assert tok.apply_chat_template(THINK, chat_template="g1", tokenize=False, add_generation_prompt=True) == \
        head + "Assistant: <think"
    assert tok.apply_chat_template(THINK, chat_template="g1", tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False) == head + "Assistant: <think>\n</think>"
    # reasoning given inline in the content, or under the other field names
    for message in ({"role": "assistant", "content": "<think>2 plus 2\n\nis 4.</think>\n\n4"},
                    {"role": "assistant", "content": "4", "thinking": "2 plus 2\nis 4."},
                    {"role": "assistant", "content": "4", "reasoning": " 2 plus 2\nis 4. "}):
        chat = [THINK[0], message, THINK[2]]
        assert tok.apply_chat_template(chat, chat_template="g1", tokenize=False) == head
    # without reasoning a turn has an empty think block (what the fake-think prompt opens)
    plain = tok.apply_chat_template(CHAT[1:3], chat_template="g1", tokenize=False)
    assert plain == "User: Hi\nthere\n\nAssistant: <think>\n</think>\nHello!\n\n"
    # the rwkv template leaves reasoning out
    assert tok.apply_chat_template(THINK[:2], tokenize=False) == "User: What is 2+2?\n\nAssistant: 4\n\n"
    # the think prompt is a token prefix of a turn with reasoning, the fake-think prompt of one without
    for kwargs, answer in (({}, THINK[1]), ({"enable_thinking": False}, {"role": "assistant", "content": "4"})):
        prompt = tok.apply_chat_template(THINK[:1], chat_template="g1", add_generation_prompt=True,
                                         return_dict=False, **kwargs)
        full = tok.apply_chat_template([THINK[0], answer], chat_template="g1", return_dict=False)
        assert full[:len(prompt)] == prompt


def test_tool_calls_tools_and_tool_results(tok):
    assert tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False) == TOOL_TEXT
    # arguments as a JSON string (the OpenAI form) are written as given; a system message takes the tool list
    chat = [{"role": "system", "content": "Be brief."}] + TOOL_CHAT
    chat[2] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    text = tok.apply_chat_template(chat, tools=TOOLS, chat_template="g1", tokenize=False)
    assert text.startswith("System: Be brief.\nTools:\n[\n{\"name\":\"get_weather\"")
    assert ('Assistant: <think>\n</think>\n```json\n{"name":"get_weather","arguments":{"city":"Paris"}}\n```\n\n'
            'User: Function output:') in text
    # the tool call is trained, the tool result is not
    out = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, return_assistant_tokens_mask=True)
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == ' ```json\n{"name":"get_weather","arguments":{"city":"Paris"}}\n```\n\n It is 20 C.\n\n'


@pytest.mark.parametrize("name,train_think", [("rwkv", True), ("g1", True), ("g1", False)])
def test_assistant_masks_equal_what_the_recipe_trains(tok, name, train_think):
    rows = [{"messages": CHAT[:3]}, {"messages": THINK + [{"role": "assistant", "content": "<think>3+3</think>6"}]},
            {"messages": TOOL_CHAT, "tools": TOOLS}]
    cfg = DataSection(train="x", format="chat", add_eos=False, template={"name": name, "train_think": train_think})
    for row in rows:
        recipe = tokenize_row(row, cfg, tok)
        out = tok.apply_chat_template(row["messages"], tools=row.get("tools"), chat_template=name,
                                      train_think=train_think, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == recipe["input_ids"]
        assert out["assistant_masks"] == [int(label != IGNORE) for label in recipe["labels"]]
        assert out["attention_mask"] == [1] * len(out["input_ids"])
    # the think switch changes the mask, never the ids
    row = {"messages": THINK[:2]}
    trained = {}
    for think in (True, False):
        out = tokenize_row(row, DataSection(train="x", format="chat", add_eos=False,
                                            template={"name": "g1", "train_think": think}), tok)
        trained[think] = (out["input_ids"],
                          tok.decode([i for i, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE]))
    assert trained[True][0] == trained[False][0]
    assert trained[True][1] == " <think>\n2 plus 2\nis 4.\n</think>\n4\n\n"
    assert trained[False][1] == "\n4\n\n"


def test_batches_padding_truncation_tensors_and_continue(tok):
    torch = pytest.importorskip("torch")
    batch = tok.apply_chat_template([CHAT[:3], CHAT[1:3]], return_assistant_tokens_mask=True, padding=True,
                                    return_tensors="pt", tokenizer_kwargs={"padding_side": "left"})
    single = tok.apply_chat_template(CHAT[1:3], return_assistant_tokens_mask=True)
    n = len(single["input_ids"])
    assert batch["input_ids"].shape == batch["assistant_masks"].shape == batch["attention_mask"].shape
    assert batch["input_ids"][1, -n:].tolist() == single["input_ids"]
    assert batch["assistant_masks"][1, -n:].tolist() == single["assistant_masks"]
    assert batch["attention_mask"][1].sum().item() == n and isinstance(batch["input_ids"], torch.Tensor)
    cut = tok.apply_chat_template(CHAT[1:3], return_assistant_tokens_mask=True, truncation=True, max_length=4)
    assert cut["input_ids"] == single["input_ids"][:4] and cut["assistant_masks"] == single["assistant_masks"][:4]
    # prefill: the final message is continued, not closed
    chat = CHAT[1:2] + [{"role": "assistant", "content": "Hel"}]
    assert tok.apply_chat_template(chat, continue_final_message=True, tokenize=False) == \
        "User: Hi\nthere\n\nAssistant: Hel"
    ids = tok.apply_chat_template(chat, continue_final_message=True, return_dict=False)
    assert tok.decode(ids) == "User: Hi\nthere\n\nAssistant: Hel"
    with pytest.raises(ValueError, match="return_dict=True"):
        tok.apply_chat_template(CHAT, return_dict=False, return_assistant_tokens_mask=True)


def test_templates_are_set_by_default_and_saved(tmp_path, tok):
    assert tok.chat_template == default_chat_templates()
    assert tok.get_chat_template() == RWKV_TEMPLATE and tok.get_chat_template("g1") == G1_TEMPLATE
    assert has_generation_blocks(RWKV_TEMPLATE) and has_generation_blocks(G1_TEMPLATE)
    tok.save_pretrained(tmp_path / "t")
    assert (tmp_path / "t" / "chat_template.jinja").read_text() == RWKV_TEMPLATE
    loaded = RWKVWorldTokenizer.from_pretrained(tmp_path / "t")
    assert loaded.chat_template == default_chat_templates()
    assert loaded.apply_chat_template(THINK, chat_template="g1", tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(THINK, chat_template="g1", tokenize=False, add_generation_prompt=True)
    # a tokenizer saved with its own template loads that one back, not the defaults
    loaded.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    loaded.save_pretrained(tmp_path / "c")
    again = RWKVWorldTokenizer.from_pretrained(tmp_path / "c")
    assert again.chat_template == loaded.chat_template
    assert again.apply_chat_template(CHAT[1:3], return_dict=False) == tok.encode("Hi\n\n\nthereHello!")


def test_recipe_template_keys(tmp_path):
    assert set(TemplateSection.model_fields["name"].annotation.__args__) == set(CHAT_TEMPLATES)
    t = DataSection(train="x", format="chat", template={"name": "g1", "train_think": False}).template
    assert t.name == "g1" and t.train_think is False
    assert DataSection(train="x").template.name == "rwkv" and DataSection(train="x").template.train_think is True
    text = "model:\n  path: m.pth\ndata:\n  train: d.jsonl\n  format: chat\n  template:\n    name: chatml\n"
    with pytest.raises(RecipeError) as info:
        recipe_from_text(text, "r.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("r.yaml:7: data.template.name: 'chatml' is not allowed; expected 'rwkv' or 'g1'")
    with pytest.raises(ValueError, match="unknown chat template 'chatml'.*g1, rwkv"):
        template_source("chatml")


def test_template_errors_are_clear(tok):
    with pytest.raises(Exception, match="role \"robot\" is not one of system, user, assistant, tool"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="segment mark"):
        render_segments([{"role": "user", "content": "a\ue000\U000f0000seg\U000f0000\ue000b"}])
    with pytest.raises(TypeError, match="not supported"):
        tok.apply_chat_template(CHAT, tokenizer_kwargs={"stride": 2})
