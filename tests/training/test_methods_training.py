"""Training with the methods API (LoRA, state tuning, both, QLoRA) on a tiny random RWKV-7."""
import json

import pytest
import torch

from rwkv_peft.recipe import recipe_from_text
from rwkv_peft.training import TrainingInterrupted, train


def recipe(tmp_path, model, data, method, name, steps=4, extra="", fmt="chat", data_extra=""):
    return recipe_from_text(f"""
model: {{path: {model}, dtype: float32{extra}}}
method: {method}
data: {{train: {data}, format: {fmt}, max_length: 48, eval_split: 4, cache_dir: {tmp_path}/cache{data_extra}}}
train: {{max_steps: {steps}, batch_size: 2, grad_accum: 1, lr: 1.0e-2, log_every: 1, eval_every: 2}}
output: {{dir: {tmp_path}/out, run_name: {name}}}
""", f"{name}.yaml")


def quiet(r, tok, **kw):
    return train(r, tokenizer=tok, progress=False, log=lambda m: None, **kw)


def test_lora_trains_and_saves_an_adapter_that_loads(tmp_path, tiny_model, chat_file, tok):
    methods = pytest.importorskip("rwkv_peft.methods")
    r = recipe(tmp_path, tiny_model, chat_file, "{lora: {enabled: true, r: 4, alpha: 8}}", "lora", steps=6)
    res = quiet(r, tok)
    assert res.losses[-1] < res.losses[0]
    assert res.final_dir.name == "adapter" and (res.final_dir / "adapter_config.json").is_file()
    # the adapter reproduces the trained model's eval loss
    base = methods.load_base_model(str(tiny_model), dtype="float32")
    model = methods.load_adapter(base, res.final_dir)
    from rwkv_peft.data import build_datasets, collate, shifted_targets
    _, ev = build_datasets(r.data, tok, seed=r.train.seed, log=lambda m: None)
    batch = collate([ev[i] for i in range(len(ev))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    t = shifted_targets(batch["labels"])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100)
    assert float(loss) == pytest.approx(res.evals[-1]["loss"], rel=1e-4)


def test_state_tuning_persona(tmp_path, tiny_model, tok):
    pytest.importorskip("rwkv_peft.methods")
    from tests.training.helpers import write_jsonl
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Arr, " + q.lower()}]}
            for q in ("Hello?", "Who are you?", "Where is the ship?", "What is for dinner?") * 4]
    data = write_jsonl(tmp_path / "persona.jsonl", rows)
    r = recipe(tmp_path, tiny_model, data, "{state_tuning: {enabled: true, lr: 0.1}}", "state", steps=6,
               fmt="persona", data_extra=", persona_in_prompt: false")
    res = quiet(r, tok)
    assert res.losses[-1] < res.losses[0]
    from safetensors.torch import load_file

    from rwkv_peft.tuners.state_tuning import STATE_FILE
    states = load_file(res.final_dir / STATE_FILE)
    assert sorted(states) == [f"blocks.{i}.att.time_state" for i in range(2)], sorted(states)
    assert all(t.abs().sum() > 0 for t in states.values())  # learned from zeros
    assert not (res.final_dir / "adapter_model.safetensors").exists()  # no LoRA in a state-only run


def test_lora_plus_state_resume_is_exact(tmp_path, tiny_model, chat_file, tok):
    pytest.importorskip("rwkv_peft.methods")
    method = "{lora: {enabled: true, r: 4, dropout: 0.1}, state_tuning: {enabled: true, lr: 0.05}}"
    full = quiet(recipe(tmp_path, tiny_model, chat_file, method, "both"), tok)

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        quiet(recipe(tmp_path, tiny_model, chat_file, method, "both2"), tok, on_step=stop)
    assert (info.value.checkpoint / "adapter").is_dir()
    from safetensors.torch import load_file
    saved = load_file(info.value.checkpoint / "trainable_0.safetensors")
    assert saved and all("lora_" in k or k.endswith("time_state") for k in saved), sorted(saved)[:5]
    r = recipe(tmp_path, tiny_model, chat_file, method, "both2")
    r.train.resume = True
    resumed = quiet(r, tok)
    assert resumed.losses == full.losses  # LoRA dropout RNG included
    state = json.loads((full.output_dir / "summary.json").read_text())
    assert state["method"] == "lora+state"


def test_qlora_nf4_on_cpu(tmp_path, tiny_model, chat_file, tok):
    pytest.importorskip("rwkv_peft.methods")
    pytest.importorskip("bitsandbytes")
    r = recipe(tmp_path, tiny_model, chat_file, "{lora: {enabled: true, r: 4}}", "qlora", steps=6,
               extra=", quantization: nf4")
    r.train.gradient_checkpointing = True
    res = quiet(r, tok)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.evals[-1]["loss"] < res.evals[0]["loss"] and res.losses[-1] < res.losses[0]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_checkpoint_changes_nothing_in_the_run(init, tmp_path, tiny_model, chat_file, tok):
    """peft's PiSSA/OLoRA conversion (run when a checkpoint writes its adapter) freezes the learned state and
    switches to eval mode; the loop restores both, so checkpointing every step gives the same run."""
    method = f"{{lora: {{enabled: true, r: 4, init: {init}}}, state_tuning: {{enabled: true, lr: 0.05}}}}"
    plain = quiet(recipe(tmp_path, tiny_model, chat_file, method, f"{init}-plain"), tok)
    r = recipe(tmp_path, tiny_model, chat_file, method, f"{init}-saved")
    r.train.save_every = 1
    saved = quiet(r, tok)
    assert saved.losses == plain.losses and saved.evals == plain.evals
