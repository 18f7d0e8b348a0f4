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


def test_push_at_the_end_of_a_run_uploads_what_publish_uploads(tmp_path, monkeypatch):
    """train's hub.push goes through hub.publish: the same card in README.md, the same upload call."""
    import types

    import huggingface_hub

    from rwkv_peft.training.checkpoint import push_to_hub
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], sorted(p.name for p in tmp_path.joinpath("hf").iterdir()),
                          kw["ignore_patterns"]))
            return types.SimpleNamespace(commit_url="https://example.invalid/commit")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    torch.save(make_blinkdl_v7(vocab=90, width=64, layers=1), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "hf")
    recipe = types.SimpleNamespace(hub=types.SimpleNamespace(repo_id="me/tiny", private=True))
    said = []
    push_to_hub(recipe, tmp_path / "hf", said.append)
    assert calls[0] == ("create", "me/tiny", True) and calls[1][1] == "me/tiny" and "README.md" in calls[1][2]
    assert calls[1][3] == ["checkpoint*/**", "*.tmp*", ".*"] and said == ["uploaded " + str(tmp_path / "hf")
                                                                          + " to https://example.invalid/commit"]
    assert (tmp_path / "hf" / "README.md").read_text() == str(build_model_card(tmp_path / "hf", "me/tiny"))
