"""The ``rwkv-peft`` console script: help on every command, exit codes, generate."""
import subprocess
import sys

import torch

from rwkv_peft.cli import COMMANDS, main
from tests.factories import make_blinkdl_v7


def test_help_lists_commands_and_each_has_help(capsys):
    assert main([]) == 2
    listed = capsys.readouterr().out
    import importlib.util
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue
        assert name in listed
        try:
            main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert "usage: rwkv-peft " + name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "rwkv_peft.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "rwkv-peft" in out.stdout


def test_generate_from_pth_is_deterministic_greedy(tmp_path, capsys):
    torch.save(make_blinkdl_v7(vocab=65536, width=64, layers=1), tmp_path / "m.pth")
    args = [str(tmp_path / "m.pth"), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(["generate", *args]) == 0
    first = capsys.readouterr().out
    assert main(["generate", *args]) == 0
    assert capsys.readouterr().out == first
    assert main(["generate", str(tmp_path / "missing.pth"), "--prompt", "x"]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_generate_samples_reproducibly_with_a_seed(capsys):
    args = ["assets:quickstart/model", "--prompt", "User: Hi\n\nAssistant:", "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main(["generate", *args]) == 0
    first = capsys.readouterr().out
    assert main(["generate", *args]) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_chat_reads_turns_from_stdin_and_carries_the_state(tmp_path, capsys, monkeypatch):
    import io

    from rwkv_peft.commands.chat import Conversation
    from rwkv_peft.commands.generate import load_for_inference
    torch.save(make_blinkdl_v7(vocab=65536, width=64, layers=1), tmp_path / "m.pth")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi there\nand again\n/exit\n"))
    assert main(["chat", str(tmp_path / "m.pth"), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("Assistant:") == 2

    model, tok = load_for_inference(tmp_path / "m.pth")
    chat = Conversation(model, tok)
    chat.feed("User: hi")
    split = chat.state
    whole = model(torch.tensor([tok("User: hi").input_ids]), use_cache=True).state
    assert all(torch.equal(a, b) for la, lb in zip(split, whole) for a, b in zip(la, lb))
    before = [s.clone() for s in chat.state[0]]
    "".join(chat.reply("hello", max_new_tokens=3, temperature=0))
    assert not torch.equal(chat.state[0][1], before[1])  # the reply moved the state on
