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
