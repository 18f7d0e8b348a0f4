"""scripts/bench_wkv_cpu.py: --help, and a tiny run of both ops in both modes writing the JSON (no timing checks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_wkv_cpu.py"


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--T", "--versions", "--batch", "--heads", "--head-size", "--chunk-size", "--repeats", "--threads",
                 "--ops-dir", "--json"):
        assert flag in out.stdout


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_wkv_cpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_wkv_cpu


@pytest.mark.slow  # nine fresh processes importing torch: 20-100 s on the shared 2-core VM
def test_tiny_run_writes_json(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    argv = ["--T", "20,40", "--versions", "v7", "--heads", "2", "--head-size", "8", "--chunk-size", "4",
            "--repeats", "1", "--threads", "1", "--json", str(out_json)]  # v6 runs in test_ops_dir_measures_a_copy
    code = _bench().main(argv)
    text = capsys.readouterr().out
    assert code == 0, text
    assert "fwd+bwd tok/s" in text and "MB/1k tok" in text
    data = json.loads(out_json.read_text())
    assert data["meta"]["threads"] == 1 and data["meta"]["date"] and data["meta"]["ops"] == "rwkv_peft.ops"
    rows = data["results"]
    assert [(r["version"], r["T"]) for r in rows] == [("v7", 20), ("v7", 40)]
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            m = r[mode]
            assert "error" not in m, m
            assert (m["version"], m["mode"], m["T"], m["heads"], m["head_size"], m["chunk_size"]) == \
                (r["version"], mode, r["T"], 2, 8, 4)
            assert m["tokens_per_s"] > 0 and m["tokens_per_cpu_s"] > 0 and len(m["times_s"]) == 1
            assert 0 < m["baseline_rss"] <= m["peak_rss"]
    assert rows[0]["fwdbwd_vs_smallest_T"] == 1.0 and rows[1]["fwdbwd_vs_smallest_T"] > 0


@pytest.mark.slow
def test_ops_dir_measures_a_copy(tmp_path, capsys):
    """--ops-dir loads wkv7.py / wkv6.py from a folder (wkv6's relative import resolves to the copy beside it)."""
    ops = Path(__file__).resolve().parents[1] / "rwkv_peft" / "ops"
    for name in ("wkv7.py", "wkv6.py"):
        (tmp_path / name).write_text((ops / name).read_text())
    code = _bench().main(["--T", "16", "--versions", "v6", "--heads", "1", "--head-size", "4", "--chunk-size", "4",
                          "--repeats", "1", "--threads", "1", "--ops-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"ops from {tmp_path}" in text
