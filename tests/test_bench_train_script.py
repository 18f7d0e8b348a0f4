"""scripts/bench_train.py: a tiny run of our training path on the CPU writes its row; the FLOPs it counts for MFU
are the model's Linear weights and peft's LoRA matrices (no timing checks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_train  # noqa: E402

sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--steps", "3",
                           "--warmup", "1", "--contexts", "32x2", "--cases", "lora+state", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    return json.loads(out.read_text())


def test_tiny_run_trains_full_rows_and_writes_its_row(tiny_run):
    (row,) = tiny_run["rows"]
    assert (row["case"], row["ctx"], row["batch"]) == ("lora+state", 32, 2)
    assert row["tokens_per_s"] > 0 and row["step_s"] > 0  # the run checks it trained 3 x 2 x 32 tokens


def test_matmul_params_are_the_models_linears_and_peft_lora(tmp_path):
    from rwkv_peft import methods
    bench_train.write_tiny_checkpoint(tmp_path / "tiny")
    total, lora = bench_train.matmul_params(tmp_path / "tiny", "lora+state", lora_r=8)
    model = methods.load_base_model(tmp_path / "tiny")
    assert total == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    peft_model = methods.apply_lora(model, r=8, alpha=16, targets="default")
    assert lora == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert bench_train.matmul_params(tmp_path / "tiny", "state", lora_r=8)[1] == 0


def test_mfu_uses_the_devices_peak():
    row = {"device": "NVIDIA H100 80GB HBM3", "tokens_per_s": 1000.0, "params": 10**9, "trainable": 10**7}
    assert bench_train.mfu(row) == pytest.approx(1000 * (4e9 + 2e7) / 989e12)
    assert bench_train.mfu({**row, "device": "cpu"}) != bench_train.mfu({**row, "device": "cpu"})  # NaN: unknown


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--cases", "lora,dora"])
    assert "unknown case(s) ['dora']" in capsys.readouterr().err
