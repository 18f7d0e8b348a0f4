"""MiSS (peft's MissConfig) and LoRA rank/alpha patterns as recipe methods, end to end on a tiny random RWKV-7:
`rwkv-peft train`, then the adapter reloads, merges (`rwkv-peft merge`) and exports to .pth."""
import json
import re

import torch

from rwkv_peft.cli import main
from tests.factories import rel_err


def write_recipe(tmp_path, model, data, tok_dir, name, method):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""model:
  path: {model}
  dtype: float32
  tokenizer: {tok_dir}
method:
{method}
data:
  train: {data}
  format: chat
  max_length: 48
  eval_split: 4
  cache_dir: {tmp_path}/cache
train:
  max_steps: 5
  batch_size: 2
  lr: 1.0e-2
  log_every: 1
output:
  dir: {tmp_path}/out
""")
    return path


def step_losses(err: str):
    """The per-step losses a run printed ("step 3/5 loss 3.2166 ...")."""
    return [float(x) for x in re.findall(r"^step \d+/\d+ loss ([\d.]+)", err, flags=re.M)]


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def test_miss_trains_saves_reloads_merges_and_exports(tmp_path, tiny_model, chat_file, tok_dir, capsys):
    from rwkv_peft.methods import load_adapter, load_base_model
    recipe = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, "miss",
                          "  miss: {enabled: true, r: 16, targets: [att.key, att.value, ffn.key, ffn.value]}")
    assert main(["train", str(recipe), "--progress", "off"]) == 0
    run = tmp_path / "out" / "miss"
    summary = json.loads((run / "summary.json").read_text())
    losses = step_losses(capsys.readouterr().err)
    assert summary["method"] == "miss" and len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    adapter = run / "adapter"
    manifest = json.loads((adapter / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"] == {"lora": False, "miss": True, "state": False}
    assert manifest["miss"]["peft_type"] == "MISS" and manifest["miss"]["r"] == 16
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "MISS"

    ids = torch.randint(1, 257, (1, 20), generator=torch.Generator().manual_seed(3))
    base = load_base_model(str(tiny_model), dtype="float32")
    base_logits = logits(base, ids)
    model = load_adapter(base, adapter)
    want = logits(model, ids)
    assert (want - base_logits).abs().max() > 1e-3  # the adapter changes the model
    again = logits(load_adapter(load_base_model(str(tiny_model), dtype="float32"), adapter), ids)
    assert torch.equal(again, want)  # reloads to the same logits

    # rwkv-peft merge (peft's merge_and_unload) -> .pth, and export --what model -> .pth
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(adapter), "--out",
                 str(tmp_path / "merged.pth")]) == 0
    merged = load_base_model(str(tmp_path / "merged.pth"), dtype="float32")
    assert not any("miss" in n for n, _ in merged.named_parameters())
    assert rel_err(logits(merged, ids), want) <= 1e-5
    assert main(["export", str(adapter), str(tmp_path / "exported.pth"), "--base", str(tiny_model),
                 "--what", "model"]) == 0
    exported = load_base_model(str(tmp_path / "exported.pth"), dtype="float32")
    assert rel_err(logits(exported, ids), want) <= 1e-5


def test_miss_plus_state_tuning(tmp_path, tiny_model, chat_file, tok_dir, capsys):
    from rwkv_peft.merge import merge_adapters
    from rwkv_peft.methods import load_adapter, load_base_model
    from rwkv_peft.tuners.state_tuning import STATE_FILE
    recipe = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, "miss_state",
                          "  miss: {enabled: true, r: 8, variant: bat}\n"
                          "  state_tuning: {enabled: true, lr: 0.05}")
    assert main(["train", str(recipe), "--progress", "off"]) == 0
    run = tmp_path / "out" / "miss_state"
    summary = json.loads((run / "summary.json").read_text())
    losses = step_losses(capsys.readouterr().err)
    assert summary["method"] == "miss+state" and len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    adapter = run / "adapter"
    manifest = json.loads((adapter / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"] == {"lora": False, "miss": True, "state": True}
    assert manifest["miss"]["variant"] == "bat"
    from safetensors.torch import load_file
    states = load_file(adapter / STATE_FILE)
    assert all(t.abs().sum() > 0 for t in states.values())  # the state trained beside MiSS
    blocks = load_file(adapter / "adapter_model.safetensors")
    assert blocks and all(k.endswith("miss_block") for k in blocks)
    assert any(t.abs().sum() > 0 for t in blocks.values())  # and MiSS trained beside the state (starts at zero)

    ids = torch.randint(1, 257, (1, 20), generator=torch.Generator().manual_seed(4))
    want = logits(load_adapter(load_base_model(str(tiny_model), dtype="float32"), adapter), ids)
    merged = merge_adapters(str(tiny_model), [adapter])
    assert merged.config.use_initial_state
    assert rel_err(logits(merged, ids), want) <= 1e-5


def test_lora_rank_and_alpha_patterns_from_the_recipe(tmp_path, tiny_model, chat_file, tok_dir):
    from safetensors.torch import load_file
    recipe = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, "patterns",
                          "  lora:\n    enabled: true\n    r: 4\n    alpha: 8\n"
                          "    rank_pattern: {blocks.0.att.key: 8, 'blocks\\.1\\.ffn\\.(key|value)': 2}\n"
                          "    alpha_pattern: {att.value: 2}")
    assert main(["train", str(recipe), "--progress", "off"]) == 0
    adapter = tmp_path / "out" / "patterns" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")

    def rank(module):
        (key,) = [k for k in weights if k.endswith(f"{module}.lora_A.weight")]
        return weights[key].shape[0]

    assert rank("blocks.0.att.key") == 8 and rank("blocks.1.att.key") == 4
    assert rank("blocks.1.ffn.key") == 2 and rank("blocks.1.ffn.value") == 2 and rank("blocks.0.ffn.key") == 4
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == {"att.value": 2.0} and cfg["rank_pattern"]["blocks.0.att.key"] == 8

    # a pattern that names no targeted module stops the run before it starts (exit 2), naming the key
    bad = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, "bad_pattern",
                       "  lora: {enabled: true, rank_pattern: {att.gate: 8}}")
    assert main(["train", str(bad), "--progress", "off"]) == 2
