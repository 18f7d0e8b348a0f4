"""The recipe schema: valid recipes, every kind of bad key/value with file:line and suggestions, overrides."""
from pathlib import Path

import pytest

from rwkv_peft.recipe import RecipeError, check_paths, load_recipe, recipe_from_text, resolve_path

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
model:
  path: models/x.pth
data:
  train: data/train.jsonl
"""


def errors(text, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_from_text(text, "r.yaml", overrides)
    return info.value.problems


def test_minimal_recipe_gets_defaults():
    r = recipe_from_text(MINIMAL, "r.yaml")
    assert r.model.dtype == "bfloat16" and r.method.kind == "full"
    assert r.data.template.roles.assistant == "Assistant" and r.data.template.turn_separator == "\n\n"
    assert r.train.schedule == "cosine" and r.run_name == "r" and r.output_dir == Path("outputs/r")


def test_every_shipped_recipe_validates():
    files = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(files) >= 20, files
    kinds = set()
    for f in files:
        r = load_recipe(f)
        kinds.add(r.method.kind)
        assert r.model.path.endswith(".pth") or r.model.path.startswith("assets:"), f
    assert {"lora", "state", "lora+state"} <= kinds


def test_unknown_key_names_line_and_suggests():
    text = MINIMAL + "train:\n  batch_size: 2\n  learning_rate: 1e-4\n"
    (p,) = errors(text)
    assert p.startswith("r.yaml:7: train.learning_rate: unknown key 'learning_rate'")
    assert "allowed in train:" in p and " lr," in p
    (p,) = errors(MINIMAL + "trian:\n  lr: 1\n")
    assert p.startswith("r.yaml:5: trian: unknown key 'trian'; did you mean 'train'?")
    (p,) = errors(MINIMAL.replace("  path:", "  pth: a\n  path:"))
    assert "r.yaml:2: model.pth: unknown key 'pth'; did you mean 'path'?" in p


def test_bad_values_name_value_and_allowed():
    text = MINIMAL + "method:\n  lora:\n    enabled: true\n    variant: dorra\n    r: 0\n"
    probs = errors(text)
    assert any(p.startswith("r.yaml:8: method.lora.variant: 'dorra' is not allowed; expected 'lora', 'dora' or "
                            "'rslora'; did you mean 'dora'?") for p in probs), probs
    assert any(p.startswith("r.yaml:9: method.lora.r: 0:") and "greater than 0" in p for p in probs), probs
    (p,) = errors(MINIMAL + "train:\n  batch_size: two\n")
    assert p.startswith("r.yaml:6: train.batch_size: 'two':") and "integer" in p
    (p,) = errors(MINIMAL + "method:\n  lora:\n    targets: [receptance, 3]\n")
    assert p.startswith("r.yaml:7: method.lora.targets.1: 3:") and "valid string" in p


def test_missing_section_and_yaml_syntax():
    (p,) = errors("data:\n  train: x.jsonl\n")
    assert p == "r.yaml:1: model: required key is missing"
    (p,) = errors("model:\n  path: [unclosed\n")
    assert p.startswith("r.yaml:") and "not valid YAML" in p
    (p,) = errors("- a\n- b\n")
    assert "a recipe is a mapping" in p


def test_cross_field_rules():
    assert "cannot be fine-tuned in full" in errors(MINIMAL.replace("  path: models/x.pth",
                                                                      "  path: x\n  quantization: nf4"))[0]
    assert "double_quant needs" in errors(MINIMAL.replace("  path: models/x.pth", "  path: x\n  double_quant: true"))[0]
    assert "chunk_len (512) must be smaller" in errors(MINIMAL + "  max_length: 256\n  long_context: {mode: chunk}\n")[0]
    assert "warmup_steps or warmup_ratio" in errors(MINIMAL + "train: {warmup_steps: 1, warmup_ratio: 0.1}\n")[0]
    assert "push: true needs repo_id" in errors(MINIMAL + "hub: {push: true}\n")[0]
    (p,) = errors(MINIMAL + "hub:\n  repo_id: me/x\n  token: hf_abc\n")
    assert "tokens are never stored in recipes" in p


def test_yaml_quirks_are_read_as_meant():
    r = recipe_from_text(MINIMAL + "train:\n  lr: 2e-4\n  mixed_precision: no\n", "r.yaml")
    assert r.train.lr == 2e-4 and r.train.mixed_precision == "no"


def test_overrides_are_typed_and_reported():
    r = recipe_from_text(MINIMAL, "r.yaml", ["train.lr=2e-4", "train.batch_size=4", "method.lora.enabled=true",
                                             "method.lora.targets=[key, value]", "data.pack=true"])
    assert r.train.lr == 2e-4 and r.train.batch_size == 4 and r.method.kind == "lora"
    assert r.method.lora.targets == ["key", "value"] and r.data.pack is True
    (p,) = errors(MINIMAL, ["train.lrr=1"])
    assert p.startswith("--set train.lrr=1: train.lrr: unknown key 'lrr'; did you mean 'lr'?")
    (p,) = errors(MINIMAL, ["train.batch_size=abc"])
    assert p.startswith("--set train.batch_size=abc: train.batch_size: 'abc'")
    assert "expected KEY=VALUE" in errors(MINIMAL, ["train.lr"])[0]
    assert "not a section" in errors(MINIMAL, ["model.path.x=1"])[0]


def test_dump_round_trip(tmp_path):
    r = recipe_from_text(MINIMAL + "method: {lora: {enabled: true, targets: [key]}}\n", "r.yaml",
                         ["train.lr=3e-4"])
    again = recipe_from_text(r.to_yaml(), "again.yaml")
    assert again.to_dict() == r.to_dict()


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_check_paths_names_lines(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(MINIMAL + "method:\n  state_tuning: {enabled: true, init: missing.pth}\n")
    probs = check_paths(load_recipe(f))
    assert any(p.startswith(f"{f}:2: model.path: model file or folder 'models/x.pth' does not exist") for p in probs)
    assert any(p.startswith(f"{f}:4: data.train:") for p in probs)
    assert any("method.state_tuning.init: state file 'missing.pth'" in p for p in probs)
    # a hub-like name is not a missing file (it is checked when loaded)
    g = tmp_path / "g.yaml"
    g.write_text(MINIMAL.replace("data/train.jsonl", "someone/some_dataset"))
    assert not any("data.train" in p for p in check_paths(load_recipe(g)))


def test_assets_prefix():
    assert resolve_path("assets:quickstart/model").parts[-3:] == ("assets", "quickstart", "model")


def test_miss_section_and_its_errors():
    r = recipe_from_text(MINIMAL + "method:\n  miss: {enabled: true, r: 32}\n  state_tuning: {enabled: true}\n",
                         "r.yaml")
    assert r.method.kind == "miss+state" and r.method.miss.variant == "balance" and r.method.miss.targets == "default"
    probs = errors(MINIMAL + "method:\n  miss:\n    enabled: true\n    variant: bta\n    r: 0\n    dropout: 1.5\n")
    assert any(p.startswith("r.yaml:8: method.miss.variant: 'bta' is not allowed; expected 'balance', 'bat' or "
                            "'mini'; did you mean 'bat'?") for p in probs), probs
    assert any(p.startswith("r.yaml:9: method.miss.r: 0:") and "greater than 0" in p for p in probs), probs
    assert any(p.startswith("r.yaml:10: method.miss.dropout: 1.5:") for p in probs), probs
    (p,) = errors(MINIMAL + "method:\n  miss:\n    enabled: true\n    variant: mini\n")
    assert p.startswith("r.yaml:7: method.miss: variant: mini needs mini_r")
    (p,) = errors(MINIMAL + "method:\n  miss:\n    mini_r: 8\n")
    assert p.startswith("r.yaml:7: method.miss: mini_r is used by variant: mini only")
    (p,) = errors(MINIMAL + "method:\n  miss:\n    rank_pattern: {att.key: 8}\n")
    assert p.startswith("r.yaml:7: method.miss.rank_pattern: unknown key 'rank_pattern'") and "one rank" in p
    (p,) = errors(MINIMAL + "method:\n  lora: {enabled: true}\n  miss: {enabled: true}\n")
    assert p.startswith("r.yaml:6: method: method.lora and method.miss are both enabled")
    r = recipe_from_text(MINIMAL, "r.yaml", ["method.miss.enabled=true", "method.miss.targets=[att.key]"])
    assert r.method.kind == "miss" and r.method.miss.targets == ["att.key"]


def test_lora_rank_and_alpha_patterns():
    r = recipe_from_text(MINIMAL + "method:\n  lora:\n    enabled: true\n    rank_pattern: {blocks.0.att.key: 8}\n"
                                   "    alpha_pattern: {'ffn\\.(key|value)': 64}\n", "r.yaml")
    assert r.method.lora.rank_pattern == {"blocks.0.att.key": 8}
    assert r.method.lora.alpha_pattern == {"ffn\\.(key|value)": 64.0}
    probs = errors(MINIMAL + "method:\n  lora:\n    rank_pattern:\n      att.key: 0\n      ffn.key: two\n")
    assert any(p.startswith("r.yaml:8: method.lora.rank_pattern.att.key: 0:") and "greater than 0" in p
               for p in probs), probs
    assert any(p.startswith("r.yaml:9: method.lora.rank_pattern.ffn.key: 'two':") for p in probs), probs
    (p,) = errors(MINIMAL + "method:\n  lora:\n    alpha_pattern: {'att.(key': 8}\n")
    assert p.startswith("r.yaml:7: method.lora.alpha_pattern: key 'att.(key' is not a valid regular expression")


PREFERENCE = MINIMAL.replace("  train: data/train.jsonl\n", "  train: data/pref.jsonl\n  format: preference\n")


def test_objectives_and_their_sections():
    r = recipe_from_text(MINIMAL, "r.yaml")
    assert r.train.objective == "sft" and r.dpo.beta == 0.1 and r.grpo.num_generations == 4
    r = recipe_from_text(PREFERENCE + "train:\n  objective: dpo\ndpo:\n  beta: 0.3\n  loss_type: ipo\n", "r.yaml")
    assert (r.train.objective, r.dpo.beta, r.dpo.loss_type) == ("dpo", 0.3, "ipo")
    assert recipe_from_text(PREFERENCE + "train:\n  objective: orpo\n", "r.yaml").orpo.beta == 0.1
    prompts = MINIMAL.replace("  train: data/train.jsonl\n", "  train: data/q.jsonl\n  format: prompt\n")
    r = recipe_from_text(prompts + "train:\n  objective: grpo\n  batch_size: 4\ngrpo:\n  reward_funcs: "
                                   "['rwkv_peft.rewards:concise', 'my_rewards.py:score']\n", "r.yaml")
    assert r.grpo.reward_funcs == ["rwkv_peft.rewards:concise", "my_rewards.py:score"]
    (p,) = errors(PREFERENCE + "train:\n  objective: dpp\n")
    assert p.startswith("r.yaml:7: train.objective: 'dpp' is not allowed") and "did you mean 'dpo'?" in p
    (p,) = errors(MINIMAL + "train:\n  objective: dpo\n")
    assert p.startswith("r.yaml: train.objective: dpo reads data.format: preference rows (prompt, chosen, "
                        "rejected); data.format is 'text'"), p
    (p,) = errors(PREFERENCE)
    assert "data.format: preference is for train.objective: dpo or orpo (train.objective is sft)" in p
    (p,) = errors(PREFERENCE + "train:\n  objective: orpo\ndpo:\n  beta: 0.2\n")
    assert "the dpo section is set but train.objective is 'orpo'" in p
    (p,) = errors(PREFERENCE + "train:\n  objective: dpo\ndpo:\n  betta: 0.2\n")
    assert p.startswith("r.yaml:9: dpo.betta: unknown key 'betta'; did you mean 'beta'?")
    (p,) = errors(PREFERENCE.replace("  format: preference\n", "  format: preference\n  long_context: "
                                     "{mode: chunk, chunk_len: 64}\n") + "train:\n  objective: dpo\n")
    assert "data.long_context.mode: chunk is not supported" in p
    (p,) = errors(PREFERENCE + "method:\n  lora: {enabled: true, init: pissa}\ntrain:\n  objective: dpo\n")
    assert "method.lora.init: pissa with train.objective: dpo" in p


def test_grpo_settings_are_checked():
    prompts = MINIMAL.replace("  train: data/train.jsonl\n", "  train: data/q.jsonl\n  format: prompt\n")
    (p,) = errors(prompts + "train:\n  objective: grpo\n  batch_size: 4\n")
    assert "grpo.reward_funcs: train.objective: grpo needs at least one reward function" in p
    probs = errors(prompts + "train:\n  objective: grpo\n  batch_size: 4\ngrpo:\n  reward_funcs: [rewards.length]\n"
                             "  num_generations: 1\n")
    assert any(p.startswith("r.yaml:10: grpo.reward_funcs: item 0 'rewards.length': expected "
                            "'package.module:function'") for p in probs), probs
    assert any(p.startswith("r.yaml:11: grpo.num_generations: 1:") for p in probs), probs
    (p,) = errors(prompts + "train:\n  objective: grpo\n  batch_size: 6\ngrpo:\n  reward_funcs: [a:b]\n")
    assert "train.batch_size x train.grad_accum (6) counts answers in grpo and must be a multiple of " \
           "grpo.num_generations (4)" in p
    (p,) = errors(prompts + "method:\n  state_tuning: {enabled: true}\ntrain:\n  objective: grpo\n  batch_size: 4\n"
                            "grpo:\n  reward_funcs: [a:b]\n  beta: 0.04\n")
    assert "grpo.beta > 0 needs a reference model" in p
    (p,) = errors(prompts + "train:\n  objective: grpo\n  batch_size: 4\ngrpo:\n  reward_funcs: [a:b, c:d]\n"
                            "  reward_weights: [1.0]\n")
    assert "reward_weights has 1 weights for 2 reward functions" in p
    r = recipe_from_text(prompts + "train:\n  objective: grpo\n  batch_size: 4\ngrpo:\n  reward_funcs:\n"
                                   "    - rwkv_peft.rewards:concise\n    - no/such/rewards.py:score\n", "r.yaml")
    assert [p for p in check_paths(r) if "reward" in p] == [
        "r.yaml: grpo.reward_funcs[1]: reward file 'no/such/rewards.py' does not exist"]
