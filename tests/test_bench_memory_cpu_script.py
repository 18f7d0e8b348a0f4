"""scripts/bench_memory_cpu.py: --help, and a tiny run of both loss paths writing the JSON (no timing checks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory_cpu.py"


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--T", "--batch", "--paths", "--loss-chunk-size", "--width", "--layers", "--json"):
        assert flag in out.stdout


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_memory_cpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_memory_cpu


@pytest.mark.slow  # two fresh processes importing torch, transformers and peft: 15-40 s on the 2-core VM
def test_tiny_run_writes_json(tmp_path, capsys):
    """Both loss paths on a tiny model, each case in its own process (as the real run does)."""
    out_json = tmp_path / "bench.json"
    argv = ["--vocab", "300", "--width", "64", "--layers", "1", "--T", "32", "--batch", "1", "--paths", "full,chunked",
            "--loss-chunk-size", "16", "--lora-r", "4", "--threads", "1", "--json", str(out_json)]
    code = _bench().main(argv)
    text = capsys.readouterr().out
    assert code == 0, text
    assert "chunked/full" in text and "105,408 parameters" in text
    data = json.loads(out_json.read_text())
    assert data["meta"]["threads"] == 1 and data["meta"]["params"] > 0 and data["meta"]["date"]
    rows = data["results"]
    assert [r["path"] for r in rows] == ["full", "chunked"]
    for r in rows:
        assert "error" not in r, r
        assert (r["T"], r["batch"], r["vocab"], r["width"], r["layers"], r["threads"]) == (32, 1, 300, 64, 1, 1)
        assert r["params"] == data["meta"]["params"] and 0 < r["trainable_params"] < r["params"]
        assert 0 < r["baseline_rss"] <= r["peak_rss"] and r["build_peak_rss"] <= r["peak_rss"]
        assert r["step_rss_over_baseline"] == r["peak_rss"] - r["baseline_rss"]
        assert r["step_s"] > 0 and r["warmup_s"] > 0 and len(r["loss"]) == 2
    full, chunked = rows
    assert full["loss_chunk_size"] is None and chunked["loss_chunk_size"] == 16
    # same seed, same model and tokens: both paths compute the same loss
    assert abs(full["loss"][0] - chunked["loss"][0]) < 1e-4, (full["loss"], chunked["loss"])
