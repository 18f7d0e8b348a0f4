"""The quickstart: recipes/quickstart.yaml and the assets it uses ship with the package and train on a CPU."""
import json
from pathlib import Path

import pytest

from rwkv_peft.cli import main
from rwkv_peft.recipe import check_paths, load_recipe, resolve_path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def test_quickstart_assets_are_complete_and_small():
    r = load_recipe(RECIPE)
    assert check_paths(r) == []
    model = resolve_path(r.model.path)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model / f).is_file(), f
    total = sum(p.stat().st_size for p in resolve_path("assets:quickstart").rglob("*") if p.is_file())
    assert total < 20e6, f"{total / 1e6:.1f} MB"
    rows = [json.loads(line) for line in resolve_path(r.data.train).read_text().splitlines()]
    assert len(rows) >= 200 and all("messages" in row for row in rows)


def test_quickstart_runs(tmp_path):
    pytest.importorskip("rwkv_peft.methods")
    code = main(["train", str(RECIPE), "--progress", "off", "--set", f"output.dir={tmp_path}",
                 "--set", "train.max_steps=3", "--set", "train.eval_every=2", "--set", "eval.max_new_tokens=8",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    out = tmp_path / "quickstart"
    assert (out / "adapter").is_dir() and (out / "loss.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lora+state" and summary["steps"] == 3
