"""scripts/bench_packing.py: the packed and padded layouts hold the same real tokens, and a tiny run writes its JSON
(no timing checks)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_packing.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_packing  # noqa: E402

sys.path.remove(str(SCRIPT.parent))


def test_layouts_hold_the_same_dialogues():
    lengths = bench_packing.dialogue_lengths(40, 10, 300, seed=1)
    assert min(lengths) >= 10 and max(lengths) <= 300
    padded = bench_packing.padded_batches(lengths, 8)
    packed = bench_packing.packed_batches(lengths, 2, 512)
    assert sum(real for _, _, real in padded) == sum(lengths) == sum(sum(map(sum, rows)) for rows in packed)
    assert [n for rows in packed for row in rows for n in row] == lengths  # in order, none split
    assert all(sum(row) <= 512 for rows in packed for row in rows)


def test_tiny_run_writes_json(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--samples", "6", "--high", "40", "--max-length", "64",
                          "--repeats", "1", "--vocab", "64", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["median"]["packed"] > 0 and res["median"]["padded"] > 0
    assert "packed / padded" in out.stdout
