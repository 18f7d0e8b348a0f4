"""Model cards for adapters and models; publishing without a network stops with a clear error."""
import json

import torch

from rwkv_peft.cli import main
from rwkv_peft.convert import convert
from rwkv_peft.hub import build_model_card
from tests.factories import make_blinkdl_v7


def test_card_for_a_model_folder(tmp_path, capsys):
    torch.save(make_blinkdl_v7(vocab=90, width=64, layers=1), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "hf")
    assert main(["publish", str(tmp_path / "hf"), "me/tiny-rwkv", "--dry-run"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "rwkv7" in card and "me/tiny-rwkv" in card
    assert "1 layers, width 64, vocab 90" in card


def test_card_for_an_adapter_folder_includes_the_recipe(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("method:\n  lora:\n    r: 8\n")
    manifest = {"format": "rwkv-peft-adapter", "contains": {"lora": True, "state": True},
                "base": {"path": "models/x.pth", "num_hidden_layers": 2, "hidden_size": 128, "num_heads": 2,
                         "head_size": 64, "vocab_size": 65536}}
    (run / "adapter" / "rwkv_peft_adapter.json").write_text(json.dumps(manifest))
    card = str(build_model_card(run / "adapter", "me/persona"))
    assert "library_name: peft" in card and "state-tuning" in card and "lora" in card
    assert "r: 8" in card and "LoRA + state tuning" in card
    manifest["contains"] = {"lora": False, "miss": True, "state": False}
    (run / "adapter" / "rwkv_peft_adapter.json").write_text(json.dumps(manifest))
    card = str(build_model_card(run / "adapter", "me/persona"))
    assert "library_name: peft" in card and "- miss" in card and "adapter (MiSS)" in card


def test_missing_folder_and_offline_upload_fail_cleanly(tmp_path, capsys, monkeypatch):
    assert main(["publish", str(tmp_path / "nothing"), "me/x", "--dry-run"]) == 2
    torch.save(make_blinkdl_v7(vocab=90, width=64, layers=1), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "hf")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_printed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["publish", str(tmp_path / "hf"), "me/x"]) == 1
    captured = capsys.readouterr()
    assert "hf_secret_never_printed" not in captured.out + captured.err
