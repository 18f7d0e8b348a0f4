"""scripts/bench_forward.py: a tiny run against the official package writes every row it prints, with the error
of each reduced-precision decode against its own package's fp32 (no timing checks)."""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_forward.py"
pytest.importorskip("rwkv")


def test_tiny_run_writes_rows_and_errors(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", "--repeats", "1", "--steps", "4",
                          "--seq", "16", "--width", "128", "--layers", "1", "--vocab", "256", "--official-bf16",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    official = f"official rwkv {importlib.metadata.version('rwkv')}"
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    rows = {r["impl"].replace(official, "official"): r for r in results}
    assert set(rows) == {"rwkv-peft, as from_pretrained loads it", "official 'cpu fp32'",
                         "official 'cpu bf16'",
                         *(f"rwkv-peft, chat / generate --cpu-weights {k}" for k in ("fp32", "fp16", "int8"))}
    assert all(r["decode"] > 0 for r in rows.values())
    fp32, int8 = (rows[f"rwkv-peft, chat / generate --cpu-weights {k}"] for k in ("fp32", "int8"))
    assert fp32["rel_rms"] < 1e-5 < int8["rel_rms"] < 0.2 and 0 <= int8["kl"] and 0 <= int8["top1_agree"] <= 1
    assert 0 < rows["official 'cpu bf16'"]["rel_rms"] < 0.2
