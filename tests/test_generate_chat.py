"""``generate --input/--output`` (batched, left padding, the same tokens as each prompt alone) and chat's /regen,
/save, /load, on the quickstart model that ships with the package (nothing downloaded)."""
import io
import json
import sys

import pytest
import torch

from rwkv_peft.cli import main

QS = "assets:quickstart/model"
PROMPTS = ["User: Tell me about bread.\n\nAssistant:", "User: Hi\n\nAssistant:",
           "User: Can you explain how trains work and why they run on rails?\n\nAssistant:", "Bread"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qs():
    from rwkv_peft.commands._common import load_for_inference
    return load_for_inference(QS)


def _chat(monkeypatch, capsys, args, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _replies(out):
    return [block.split("Assistant:", 1)[1] for block in out.split("\n\n") if block.startswith("Assistant:")]


def _settings(**kw):
    s = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, presence_penalty=0.0, frequency_penalty=0.0,
             penalty_decay=0.996)
    s.update(kw)
    return s


# ---- generate: batches ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("penalties", [{}, {"presence_penalty": 8.0, "frequency_penalty": 4.0, "penalty_decay": 0.9}])
def test_batched_generation_gives_each_prompt_its_own_greedy_tokens(qs, penalties):
    from rwkv_peft.commands.generate import generate_batch
    model, tok = qs
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: real left padding
    settings = _settings(max_new_tokens=20, **penalties)  # the tiny model is sure of itself: strong penalties
    batched = generate_batch(model, prompts, settings, uncounted_ids=[5])
    alone = [generate_batch(model, [p], settings, uncounted_ids=[5])[0] for p in prompts]
    assert batched == alone
    assert all(len(t) > 0 for t in batched)
    if penalties:  # the penalties change something, so the check above covers them
        assert batched != [generate_batch(model, [p], _settings(max_new_tokens=20))[0] for p in prompts]


def test_generate_input_output_jsonl(tmp_path, capsys):
    rows = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]
    rows.insert(2, {"id": "m", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Tell me about bread."}]})
    rows.append({"id": "short", "prompt": PROMPTS[0], "max_new_tokens": 3, "temperature": 0})
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[3:])
                   + "\n")
    out = tmp_path / "out.jsonl"
    common = [QS, "--temperature", "0", "--max-new-tokens", "8"]
    assert main(["generate", *common, "--input", str(src), "--output", str(out), "--batch-size", "3"]) == 0
    assert "wrote 6 completions" in capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "completion"} for g in got] == rows  # input fields, in order
    # each row is what --prompt gives alone
    for g in got:
        if "prompt" in g:
            argv = ["generate", *common, "--prompt", g["prompt"]] + \
                (["--max-new-tokens", str(g["max_new_tokens"])] if "max_new_tokens" in g else [])
            assert main(argv) == 0
            assert capsys.readouterr().out == g["completion"] + "\n"
    assert got[-1]["completion"] and len(got[-1]["completion"]) < len(got[0]["completion"])  # 3 tokens
    # messages render as chat feeds them
    assert main(["generate", *common, "--prompt", "System: Be brief.\n\nUser: Tell me about bread.\n\nAssistant:"]) == 0
    assert capsys.readouterr().out == got[2]["completion"] + "\n"

    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_render_messages_is_what_chat_feeds():
    from rwkv_peft.commands.chat import render_messages, user_turn
    assert render_messages([{"role": "user", "content": " hi "}]) == user_turn("hi")
    assert render_messages([{"role": "system", "content": "S"}, {"role": "human", "content": "a"},
                            {"role": "gpt", "content": "b"}, {"role": "user", "content": "c"}], "U", "A") == \
        "System: S\n\nU: a\n\nA: b\n\nU: c\n\nA:"
    assert user_turn("two\n\nparas") == "User: two\nparas\n\nAssistant:"  # as training writes a turn
    assert user_turn("q", template="g1") == "User: q\n\nAssistant: <think"
    assert user_turn("q", template="g1", think=False) == "User: q\n\nAssistant: <think>\n</think>"
    with pytest.raises(ValueError, match="last message should be the user's"):
        render_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "x"', "line 2: not valid JSON"),
    ('["x"]', "line 2: expected a JSON object"),
    ('{"text": "x"}', "line 2: no 'prompt' or 'messages' field; the row has: text"),
    ('{"prompt": 3}', "line 2: field 'prompt' should be text, found int"),
    ('{"prompt": "  "}', "line 2: field 'prompt' is empty"),
    ('{"prompt": "x", "max_new_tokens": 2.5}', "line 2: field 'max_new_tokens' should be an integer, found 2.5"),
    ('{"prompt": "x", "temperature": "hot"}', "line 2: field 'temperature' should be a number"),
    ('{"prompt": "x", "top_p": 3}', "line 2: field 'top_p': top_p should be within [0, 1]"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: field 'messages': message 1: role 'robot'"),
])
def test_bad_input_rows_name_the_file_line_and_field(tmp_path, capsys, line, expected):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert main(["generate", QS, "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"error: {src} {expected}" in err or f"p.jsonl {expected}" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_argument_errors(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "x"}\n')
    assert main(["generate", QS, "--input", str(src)]) == 2
    assert "--input needs --output" in capsys.readouterr().err
    assert main(["generate", QS, "--input", str(src), "--output", str(tmp_path / "o.txt")]) == 2
    assert "does not write .txt files" in capsys.readouterr().err
    assert main(["generate", QS, "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["generate", QS, "--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "no rows" in capsys.readouterr().err
    assert main(["generate", QS, "--prompt", "x", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "--output goes with --input" in capsys.readouterr().err
    assert main(["generate", QS, "--prompt", "x", "--penalty-decay", "2"]) == 2
    assert "--penalty-decay" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --prompt and --input exclude each other
        main(["generate", QS, "--prompt", "x", "--input", str(src)])


# ---- chat: /regen ------------------------------------------------------------------------------------------

def test_regen_greedy_gives_the_same_answer(monkeypatch, capsys):
    args = [QS, "--temperature", "0", "--max-new-tokens", "8", "--frequency-penalty", "0.5"]
    code, out, err = _chat(monkeypatch, capsys, args, ["Tell me about bread.", "/regen", "Hi", "/regen"])
    assert code == 0, err
    replies = _replies(out)
    assert len(replies) == 4 and replies[0].strip()
    assert replies[1] == replies[0] and replies[3] == replies[2]
    code, out, err = _chat(monkeypatch, capsys, args, ["/regen", "/reset", "/regen"])
    assert _replies(out) == [] and err.count("nothing to regenerate") == 2


@pytest.fixture(scope="module")
def random_pth(tmp_path_factory):
    """A tiny random RWKV-7 (World vocabulary): its flat distributions make sampled answers differ."""
    from tests.factories import make_blinkdl_v7
    path = tmp_path_factory.mktemp("random") / "m.pth"
    torch.save(make_blinkdl_v7(vocab=65536, width=64, layers=1), path)
    return path


def test_regen_samples_a_new_answer_from_the_same_state(random_pth, monkeypatch, capsys):
    from rwkv_peft.commands._common import load_for_inference
    from rwkv_peft.commands.chat import Conversation
    model, tok = load_for_inference(random_pth)
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, presence_penalty=0.5, frequency_penalty=0.5)
    chat = Conversation(model, tok)
    first = "".join(chat.reply("Tell me about bread.", generator=torch.Generator().manual_seed(1), **kw))
    again = "".join(chat.regen(generator=torch.Generator().manual_seed(1), **kw))
    other = "".join(chat.regen(generator=torch.Generator().manual_seed(2), **kw))
    assert again == first  # the same state and the same random numbers
    assert other != first  # another seed: another answer
    assert chat.transcript == [{"role": "user", "content": "Tell me about bread."},
                               {"role": "assistant", "content": other.strip()}]
    # in the command, /regen draws on the random numbers that follow the first answer's: another answer
    args = [str(random_pth), "--temperature", "1", "--top-p", "1", "--max-new-tokens", "6", "--seed", "1"]
    code, out, err = _chat(monkeypatch, capsys, args, ["Tell me about bread.", "/regen"])
    assert code == 0, err
    replies = _replies(out)
    assert len(replies) == 2 and replies[0] != replies[1]
    code, out2, _ = _chat(monkeypatch, capsys, args, ["Tell me about bread.", "/regen"])
    assert _replies(out2) == replies  # reproducible with --seed


# ---- chat: /save and /load ---------------------------------------------------------------------------------

def test_save_and_load_continue_identically(tmp_path, monkeypatch, capsys):
    args = [QS, "--temperature", "0", "--max-new-tokens", "8", "--system", "You are a baker."]
    code, out, err = _chat(monkeypatch, capsys, args, ["Tell me about bread.", f"/save {tmp_path / 'c'}",
                                                       "Can you explain trains?", "/regen"])
    assert code == 0, err
    assert f"(conversation saved to {tmp_path / 'c.safetensors'})" in out
    straight = _replies(out)
    assert (tmp_path / "c.safetensors").is_file()
    # a fresh session without --system: the loaded state and transcript carry everything
    code, out, err = _chat(monkeypatch, capsys, [QS, "--temperature", "0", "--max-new-tokens", "8"],
                           [f"/load {tmp_path / 'c'}", "Can you explain trains?", "/regen"])
    assert code == 0, err
    assert "(conversation loaded from" in out and "1 answer so far" in out
    assert _replies(out) == straight[1:]
    # /regen right after /load answers the saved last message again
    code, out, err = _chat(monkeypatch, capsys, [QS, "--temperature", "0", "--max-new-tokens", "8"],
                           [f"/load {tmp_path / 'c.safetensors'}", "/regen"])
    assert _replies(out) == straight[:1]


def test_save_load_round_trip_of_the_conversation_object(tmp_path, qs):
    from rwkv_peft.commands.chat import Conversation
    model, tok = qs
    chat = Conversation(model, tok)
    chat.system("Be brief.")
    "".join(chat.reply("hi", max_new_tokens=5, temperature=0))
    path = chat.save(tmp_path / "conv.safetensors")
    follow = "".join(chat.reply("and bread?", max_new_tokens=6, temperature=0))
    other = Conversation(model, tok)
    other.load(path)
    assert other.transcript[:3] == chat.transcript[:3] and other.transcript[0]["role"] == "system"
    assert "".join(other.reply("and bread?", max_new_tokens=6, temperature=0)) == follow
    assert all(torch.equal(a, b) for la, lb in zip(other.state, chat.state) for a, b in zip(la, lb))
    other.reset()  # back to the saved conversation's start (after its system text)
    assert other.transcript == [{"role": "system", "content": "Be brief."}]


def test_load_refuses_a_conversation_of_another_model(tmp_path, qs, monkeypatch, capsys):
    from rwkv_peft.commands.chat import Conversation, ConversationFileError
    from tests.factories import make_blinkdl_v7
    model, tok = qs
    chat = Conversation(model, tok)
    "".join(chat.reply("hi", max_new_tokens=3, temperature=0))
    path = chat.save(tmp_path / "qs")
    torch.save(make_blinkdl_v7(vocab=65536, width=64, layers=1), tmp_path / "m.pth")
    code, out, err = _chat(monkeypatch, capsys, [str(tmp_path / "m.pth"), "--temperature", "0",
                                                 "--max-new-tokens", "3"], [f"/load {path}", "hi"])
    assert code == 0 and len(_replies(out)) == 1  # the error is reported and the chat goes on
    assert "was saved with another model's sizes" in err
    assert "hidden_size 128 (this model: 64)" in err and "num_hidden_layers 4 (this model: 1)" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversationFileError, match="not a conversation saved by /save"):
        chat.load(tmp_path / "junk.safetensors")
    with pytest.raises(ConversationFileError, match="no such file"):
        chat.load(tmp_path / "missing")


def test_generate_prompt_streams(monkeypatch):
    """--prompt prints the completion piece by piece as it is generated (then a newline), the same text."""
    import io
    writes = []

    class Out(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)
    out = Out()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", QS, "--temperature", "0", "--max-new-tokens", "8", "--prompt", PROMPTS[0]]) == 0
    assert len([w for w in writes if w]) > 2 and out.getvalue().endswith("\n") and out.getvalue().strip()
