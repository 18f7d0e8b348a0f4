"""scripts/bench_memory.py: --help, the plan (sizes from the config), the CPU message, the random checkpoint."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_memory.py"


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_memory
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_memory


def test_help_and_dry_run(capsys):
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--dry-run" in out.stdout
    bench = _bench()
    assert bench.main(["--dry-run", "--shapes", "0.1B,2.9B", "--ctx", "1024"]) == 0
    text = capsys.readouterr().out
    assert "0.1B: RWKV-7" in text and "12 layers, width 768" in text
    assert "32 layers, width 2560" in text and "12 cases" in text
    with pytest.raises(SystemExit) as e:
        bench.main(["--dry-run", "--shapes", "7B"])
    assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cpu_exits_with_a_message(capsys):
    assert _bench().main(["--shapes", "0.1B"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_random_checkpoint_is_sane(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setitem(bench.SHAPES, "tiny", (1, 128))
    monkeypatch.setattr(bench, "VOCAB", 300)
    bench.write_random_checkpoint("tiny", tmp_path / "ckpt")
    from rwkv_peft.methods import load_base_model
    model = load_base_model(tmp_path / "ckpt", dtype="float32")
    assert sum(p.numel() for p in model.parameters()) == bench.count_params(bench.config_for("tiny"))
    ids = torch.randint(0, 300, (1, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(float(loss.detach()) - torch.log(torch.tensor(300.0))) < 0.5


@pytest.mark.parametrize("method,precision", [("lora+state", "nf4"), ("state", "bf16")])
def test_one_case_runs_on_cpu(method, precision, tmp_path, monkeypatch):
    """The per-case code path the GPU run uses (load, attach, checkpointing, chunked loss, AdamW), on CPU."""
    import argparse
    bench = _bench()
    monkeypatch.setitem(bench.SHAPES, "tiny", (1, 128))
    monkeypatch.setattr(bench, "VOCAB", 300)
    bench.write_random_checkpoint("tiny", tmp_path / "ckpt")
    args = argparse.Namespace(checkpoint=str(tmp_path / "ckpt"), shape="tiny", method=method, precision=precision,
                              ctx=24, batch=1, steps=2, lora_r=4, lora_targets="default", loss_chunk_size=8,
                              checkpointing=True, params=1, device="cpu")
    row = bench.run_case(args)
    assert row["loss_mode"] == "chunked" and len(row["loss"]) == 2
    assert all(abs(x - 5.7) < 0.6 for x in row["loss"]), row["loss"]
    assert ("lora" in row["trainable"]) == ("lora" in method) and "state" in row["trainable"]
