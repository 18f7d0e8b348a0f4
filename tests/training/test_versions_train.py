"""Every RWKV version through the whole command line, written once and run per version: train LoRA (and state
tuning where the version has it) from a .pth, the eval loss falls, then eval, merge and generate use the
result."""
import json

import pytest
import torch

from rwkv_peft import versions
from rwkv_peft.cli import main
from tests.factories import make_blinkdl_v7
from tests.factories_v4 import make_blinkdl_v4
from tests.factories_v5 import make_blinkdl_v5
from tests.factories_v6 import make_blinkdl_v6
from tests.training.helpers import VOCAB
from tests.training.test_cli import write_recipe

CHECKPOINTS = {  # a tiny random .pth of each version, the byte tokenizer's vocabulary
    "rwkv7": lambda: make_blinkdl_v7(VOCAB, 64, 2, head_size=32),
    "rwkv7-deepembed": lambda: make_blinkdl_v7(VOCAB, 64, 2, head_size=32, deep_embed=32),
    "rwkv6": lambda: make_blinkdl_v6(VOCAB, 64, 2, head_size=32),
    "rwkv5": lambda: make_blinkdl_v5(VOCAB, 64, 2, head_size=32),
    "rwkv4": lambda: make_blinkdl_v4(VOCAB, 64, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_train_eval_merge_generate(name, tmp_path, chat_file, tok_dir, capsys):
    pth = tmp_path / f"{name}.pth"
    torch.save(CHECKPOINTS[name](), pth)
    version = versions.by_blinkdl({"rwkv7": "7", "rwkv6": "6", "rwkv5": "5.2", "rwkv4": "4"}[name.split("-")[0]])
    sets = ["method.lora.enabled=true", "method.lora.targets=all", "train.max_steps=8", "train.eval_every=8",
            "train.save_every=8"]
    if version.state_tuning:
        sets.append("method.state_tuning.enabled=true")
    recipe = write_recipe(tmp_path, pth, chat_file, tok_dir, name=name)
    capsys.readouterr()
    assert main(["eval", str(recipe), "--base", "--json"]) == 0              # the base on the held-out rows
    base_loss = json.loads(capsys.readouterr().out)["loss"]
    assert main(["train", str(recipe), "--progress", "off", *[a for kv in sets for a in ("--set", kv)]]) == 0
    out = tmp_path / "out" / name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evals"][-1]["loss"] < base_loss - 1.0, (base_loss, summary["evals"])
    adapter = out / "adapter"
    manifest = json.loads((adapter / "rwkv_peft_adapter.json").read_text())
    assert version.name in json.dumps(manifest)
    capsys.readouterr()
    assert main(["eval", str(recipe), "--adapter", str(adapter), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(summary["evals"][-1]["loss"], rel=1e-4)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged.pth"), "--base", str(pth)]) == 0
    merged = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert set(merged) >= set(torch.load(pth, weights_only=True)) - {"blocks.0.att.time_state"}
    assert main(["generate", str(tmp_path / "merged.pth"), "--tokenizer", str(tok_dir), "--max-new-tokens", "4",
                 "--temperature", "0", "--prompt", "User: hi\n\nAssistant:"]) == 0
