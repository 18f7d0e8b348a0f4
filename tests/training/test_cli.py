"""`rwkv-peft train` / `validate` exit codes, and two processes through `accelerate launch` (gloo on CPU)."""
import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from rwkv_peft.cli import main


def write_recipe(tmp_path, model, data, tok_dir, name="cli", extra_train=""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""# a tiny run for the tests
model:
  path: {model}
  dtype: float32
  tokenizer: {tok_dir}
data:
  train: {data}
  format: chat
  max_length: 48
  eval_split: 4
  cache_dir: {tmp_path}/cache
train:
  max_steps: 3
  batch_size: 2
  lr: 3.0e-3
  log_every: 1
  save_every: 2{extra_train}
output:
  dir: {tmp_path}/out
""")
    return path


@pytest.mark.parametrize("command", ["train", "validate", "eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "--set" in capsys.readouterr().out


def test_validate_exit_codes(tmp_path, tiny_model, chat_file, tok_dir, capsys):
    good = write_recipe(tmp_path, tiny_model, chat_file, tok_dir)
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "--print"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("  lr: 3.0e-3", "  lrate: 3.0e-3"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:15: train.lrate: unknown key 'lrate'; did you mean 'lr'?" in err
    assert main(["validate", str(good), "--set", "train.schedule=cosin"]) == 2
    assert "--set train.schedule=cosin: train.schedule: 'cosin' is not allowed" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    missing.write_text(good.read_text().replace(str(chat_file), str(tmp_path / "nope.jsonl")))
    assert main(["validate", str(missing)]) == 2
    assert f"{missing}:7: data.train:" in capsys.readouterr().err
    assert main(["validate", str(missing), "--no-check-files"]) == 0
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2


def test_train_exit_codes(tmp_path, tiny_model, chat_file, tok_dir, capsys):
    good = write_recipe(tmp_path, tiny_model, chat_file, tok_dir)
    assert main(["train", str(good), "--progress", "off"]) == 0
    out = tmp_path / "out" / "cli"
    assert (out / "model" / "model.safetensors").is_file()
    cap = capsys.readouterr()
    assert str(out / "model") in cap.out
    # it ends with the commands that use the full model it made (an adapter run: tests/test_cli_paths.py)
    assert f"rwkv-peft chat {out / 'model'}\n" in cap.err
    assert f"rwkv-peft export {out / 'model'} {out / 'model.pth'}\n" in cap.err
    assert f"rwkv-peft eval {good}" in cap.err
    # eval: the trained model, then the base, on the held-out rows
    assert main(["eval", str(good), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert trained["loss"] == pytest.approx(summary["evals"][-1]["loss"], rel=1e-5) and trained["rows"] == 4
    assert main(["eval", str(good), "--base", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > trained["loss"]
    assert main(["eval", str(good), "--set", "output.run_name=none"]) == 2
    assert "no trained adapter/ or model/" in capsys.readouterr().err
    # a second run into the same folder: bad input, unless resumed (nothing left to do) or overwritten
    assert main(["train", str(good), "--progress", "off"]) == 2
    assert "train.resume: true" in capsys.readouterr().err
    assert main(["train", str(good), "--progress", "off", "--resume"]) == 0
    assert main(["train", str(good), "--progress", "off", "--set", "output.overwrite=true",
                 "--set", "train.max_steps=1"]) == 0
    # bad recipe value, bad data, NaN loss
    assert main(["train", str(good), "--set", "train.batch_size=0"]) == 2
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 3)
    assert main(["train", str(good), "--set", f"data.train={bad_rows}", "--set", "output.run_name=bad"]) == 2
    assert "row 1: no assistant message" in capsys.readouterr().err
    sd = torch.load(tiny_model)
    sd["head.weight"].fill_(float("nan"))
    torch.save(sd, tmp_path / "nan.pth")
    assert main(["train", str(good), "--set", f"model.path={tmp_path / 'nan.pth'}", "--set",
                 "output.run_name=nan"]) == 1
    assert "loss is nan at step 1" in capsys.readouterr().err


# every method on two gloo processes; parameters outside the loss (RWKV-7 layer 0's v_lora) must not stall DDP
METHODS_ON_TWO_PROCESSES = {
    "full": [],
    "lora-all+state": ["method.lora.enabled=true", "method.lora.targets=all", "method.state_tuning.enabled=true"],
    "state": ["method.state_tuning.enabled=true"],
    "lora-chunked": ["method.lora.enabled=true", "method.lora.targets=all", "data.long_context.mode=chunk",
                     "data.long_context.chunk_len=16", "data.long_context.grad_chunks=2", "train.grad_accum=2"],
    # the initial state is read by a row's first window only; the step's last backward (the one DDP syncs)
    # comes from a later window
    "state-chunked": ["method.state_tuning.enabled=true", "data.long_context.mode=chunk",
                      "data.long_context.chunk_len=8", "data.long_context.grad_chunks=1"],
}


@pytest.mark.parametrize("method", sorted(METHODS_ON_TWO_PROCESSES))
def test_two_processes_with_accelerate_launch(method, tmp_path, tiny_model, chat_file, tok_dir):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    good = write_recipe(tmp_path, tiny_model, chat_file, tok_dir, name="ddp", extra_train="\n  eval_every: 2")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    sets = [a for kv in METHODS_ON_TWO_PROCESSES[method] for a in ("--set", kv)]
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rwkv_peft.cli", "train", str(good),
           "--progress", "off", *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "out" / "ddp"
    state = json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (out / "checkpoints" / "step-0000002" / "random_states_1.pkl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and len(summary["evals"]) == 2
    assert all(math.isfinite(x) for x in state["losses"])
    assert (out / ("model" if method == "full" else "adapter")).is_dir()
