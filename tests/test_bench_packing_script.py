"""scripts/bench_packing.py: both layouts of the persona recipe train the same dialogues, padded micro-batches
carry the padding, and a tiny run on the CPU writes its JSON (no timing checks)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_packing.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_packing  # noqa: E402

sys.path.remove(str(SCRIPT.parent))


def test_dialogues_are_persona_rows_of_about_the_asked_length(tmp_path):
    lengths = bench_packing.dialogue_lengths(40, 10, 300, seed=1)
    assert min(lengths) >= 10 and max(lengths) <= 300 and len(set(lengths)) > 20
    path = tmp_path / "d.jsonl"
    bench_packing.write_dialogues(path, lengths, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 40
    for n, row in zip(lengths, rows):
        roles = [t["role"] for t in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        words = sum(len(t["content"].split()) for t in row["messages"])
        assert n - 4 * len(roles) <= words <= n + 8          # a closing assistant turn has at least 4


def test_layouts_train_the_same_dialogues(tmp_path):
    """The two layouts' recipes (the model is not loaded here: counting tokens needs the tokenizer only)."""
    from rwkv_peft.recipe import load_recipe
    data = tmp_path / "d.jsonl"
    bench_packing.write_dialogues(data, bench_packing.dialogue_lengths(30, 16, 200, seed=0), seed=0)
    args = argparse.Namespace(recipe=ROOT / "recipes" / "rwkv7-0.1b-state-persona.yaml", device="cpu",
                              set=["data.max_length=256"])
    counts = {}
    for layout in bench_packing.LAYOUTS:
        recipe = load_recipe(args.recipe, bench_packing.layout_overrides(args, layout, tmp_path / "model", data,
                                                                         tmp_path))
        assert recipe.data.pack is (layout == "packed") and recipe.data.pack_state == "reset"
        assert recipe.data.eval_split == 0 and not recipe.eval.prompts and recipe.train.max_steps is None
        assert recipe.train.batch_size == 4 and recipe.data.max_length == 256  # the recipe's own, and --set
        counts[layout] = bench_packing.epoch_tokens(recipe)
    padded, packed = counts["padded"], counts["packed"]
    assert padded["real"] == packed["real"] > 0                    # every dialogue once, in either layout
    assert padded["rows"] == 30 and packed["rows"] < 30            # packed rows hold several dialogues
    assert padded["ran"] - padded["real"] > packed["ran"] - packed["real"]


@pytest.mark.slow
def test_tiny_run_writes_json(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--samples", "12", "--high", "64",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    for layout in ("padded", "packed"):
        r = res["layouts"][layout]
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["real"] <= r["ran"]
    assert "packed / padded" in out.stdout
