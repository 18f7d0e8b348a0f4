"""The training loop end to end on a tiny random RWKV-7 (full fine-tune: no methods module needed)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rwkv_peft.recipe import recipe_from_text
from rwkv_peft.training import TrainingDiverged, TrainingInterrupted, TrainingSetupError, train


def make_recipe(tmp_path, model, data, extra="", train_extra="", name="run", fmt="chat", max_length=48):
    text = f"""
model: {{path: {model}, dtype: float32}}
data: {{train: {data}, format: {fmt}, max_length: {max_length}, eval_split: 4, cache_dir: {tmp_path}/cache}}
train: {{max_steps: 4, batch_size: 2, grad_accum: 2, lr: 3.0e-3, log_every: 1, warmup_steps: 1{train_extra}}}
output: {{dir: {tmp_path}/out, run_name: {name}}}
{extra}
"""
    return recipe_from_text(text, "test.yaml")


def test_full_finetune_loss_goes_down_and_writes_outputs(tmp_path, tiny_model, chat_file, tok):
    r = make_recipe(tmp_path, tiny_model, chat_file, train_extra=", max_steps: 6, eval_every: 3, save_every: 3")
    res = train(r, tokenizer=tok, progress=False, log=lambda m: None)
    assert res.steps == 6 and len(res.losses) == 6
    assert res.losses[-1] < res.losses[0]
    assert [e["step"] for e in res.evals] == [3, 6]
    assert res.evals[-1]["loss"] < res.evals[0]["loss"] - 0.05 and res.evals[-1]["ppl"] > 1
    out = res.output_dir
    for f in ("recipe.yaml", "loss.png", "summary.json", "model/config.json", "model/model.safetensors",
              "model/tokenizer.json", "checkpoints/step-0000003/trainer_state.json",
              "checkpoints/step-0000003/optimizer.bin"):
        assert (out / f).is_file(), f
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((out / "checkpoints").glob(".*")), "no temporary checkpoint folders left"
    # the saved model loads and is the trained one
    from rwkv_peft import RWKV7ForCausalLM
    m = RWKV7ForCausalLM.from_pretrained(out / "model")
    ck = load_file(out / "checkpoints/step-0000003/trainable_0.safetensors")
    assert "model.blocks.0.att.v0" not in ck          # layer 0 ignores v0: it is frozen
    assert not torch.equal(m.head.weight, ck["head.weight"])  # trained further after step 3
    # the resolved recipe is a valid recipe
    again = recipe_from_text((out / "recipe.yaml").read_text(), "resolved.yaml")
    assert again.to_dict() == r.to_dict()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["method"] == "full"


def test_interrupt_and_resume_is_exact(tmp_path, tiny_model, chat_file, tok):
    """train 5 steps; vs. Ctrl-C after step 2 (checkpoint) + resume: same losses and weights bit for bit."""
    extra = ", max_steps: 5, eval_every: 2"
    full = train(make_recipe(tmp_path, tiny_model, chat_file, train_extra=extra, name="full"),
                 tokenizer=tok, progress=False, log=lambda m: None)

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    r = make_recipe(tmp_path, tiny_model, chat_file, train_extra=extra, name="cut")
    with pytest.raises(TrainingInterrupted) as info:
        train(r, tokenizer=tok, progress=False, log=lambda m: None, on_step=stop)
    assert info.value.checkpoint is not None and info.value.checkpoint.name == "step-0000002"
    state = json.loads((info.value.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["micro_batch"] == 4 and len(state["losses"]) == 2

    r2 = make_recipe(tmp_path, tiny_model, chat_file, train_extra=extra + ", resume: true", name="cut")
    resumed = train(r2, tokenizer=tok, progress=False, log=lambda m: None)
    assert resumed.losses == full.losses
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in full.evals]
    a = load_file(full.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, tiny_model, chat_file, tok):
    r = make_recipe(tmp_path, tiny_model, chat_file, train_extra=", max_steps: 2, save_every: 1")
    train(r, tokenizer=tok, progress=False, log=lambda m: None)
    with pytest.raises(TrainingSetupError, match="train.resume: true"):
        train(r, tokenizer=tok, progress=False, log=lambda m: None)
    r.output.overwrite = True
    assert train(r, tokenizer=tok, progress=False, log=lambda m: None).steps == 2


def test_nan_loss_stops_naming_the_step(tmp_path, chat_file, tok):
    from tests.training.helpers import tiny_model_file
    path = tiny_model_file(tmp_path / "nan.pth")
    sd = torch.load(path)
    sd["head.weight"][5, 0] = float("nan")
    torch.save(sd, path)
    r = make_recipe(tmp_path, path, chat_file)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 1, micro-batch 1 of 2 \(epoch 1, batch 1, rows"):
        train(r, tokenizer=tok, progress=False, log=lambda m: None)


def test_grad_accum_matches_a_bigger_batch(tmp_path, tiny_model, chat_file, tok):
    a = train(make_recipe(tmp_path, tiny_model, chat_file, train_extra=", max_steps: 2, batch_size: 4, grad_accum: 1",
                          name="a"), tokenizer=tok, progress=False, log=lambda m: None)
    b = train(make_recipe(tmp_path, tiny_model, chat_file, train_extra=", max_steps: 2, batch_size: 2, grad_accum: 2",
                          name="b"), tokenizer=tok, progress=False, log=lambda m: None)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


def test_epochs_set_the_number_of_steps(tmp_path, tiny_model, chat_file, tok):
    r = make_recipe(tmp_path, tiny_model, chat_file, name="epochs")
    r.train.max_steps = None
    r.train.epochs = 1.5
    res = train(r, tokenizer=tok, progress=False, log=lambda m: None)
    # 20 rows / batch 2 = 10 micro-batches per epoch; x 1.5 epochs / grad_accum 2 = 8 steps (rounded up)
    assert res.steps == 8


def test_chunked_long_context_matches_one_pass(tmp_path, tiny_model, chat_file, tok):
    """Chunks with the state carried and the gradient through all chunks = one pass (loss and update)."""
    one = train(make_recipe(tmp_path, tiny_model, chat_file, train_extra=", max_steps: 2", name="one"),
                tokenizer=tok, progress=False, log=lambda m: None)
    txt = f"""
model: {{path: {tiny_model}, dtype: float32}}
data: {{train: {chat_file}, format: chat, max_length: 48, eval_split: 4, cache_dir: {tmp_path}/cache,
       long_context: {{mode: chunk, chunk_len: 16, grad_chunks: 3}}}}
train: {{max_steps: 2, batch_size: 2, grad_accum: 2, lr: 3.0e-3, log_every: 1, warmup_steps: 1}}
output: {{dir: {tmp_path}/out, run_name: chunk}}
"""
    ch = train(recipe_from_text(txt, "c.yaml"), tokenizer=tok, progress=False, log=lambda m: None)
    assert ch.losses == pytest.approx(one.losses, rel=1e-4)
    assert ch.evals[-1]["loss"] == pytest.approx(one.evals[-1]["loss"], rel=1e-4)
    # truncated backprop (detach every chunk) runs and learns
    r = recipe_from_text(txt.replace("grad_chunks: 3", "grad_chunks: 1").replace("run_name: chunk", "run_name: tbptt")
                         .replace("max_steps: 2", "max_steps: 3"), "c.yaml")
    tb = train(r, tokenizer=tok, progress=False, log=lambda m: None)
    assert tb.losses[0] == pytest.approx(one.losses[0], rel=1e-4) and tb.losses[-1] < tb.losses[0]


def test_bf16_checkpointing_and_constant_schedule(tmp_path, tiny_model, chat_file, tok):
    r = make_recipe(tmp_path, tiny_model, chat_file, name="bf16",
                    train_extra=", max_steps: 2, mixed_precision: bf16, gradient_checkpointing: true, "
                                "schedule: constant, grad_clip: 0.5, report_to: [tensorboard, wandb]")
    # the time mix runs inside each (checkpointed) block: spy on it, not on the block's own forward
    from rwkv_peft.models.rwkv7.modeling_rwkv7 import RWKV7TimeMix
    calls, forward = [], RWKV7TimeMix.forward

    def spy(self, *args, **kwargs):  # what each time-mix call with gradients saw
        if torch.is_grad_enabled():
            out = forward(self, *args, **kwargs)
            calls.append((torch.is_autocast_enabled("cpu"), out[0].dtype))
            return out
        return forward(self, *args, **kwargs)

    logs = []
    RWKV7TimeMix.forward = spy
    try:
        res = train(r, tokenizer=tok, progress=True, log=logs.append)
    finally:
        RWKV7TimeMix.forward = forward
    assert all(torch.isfinite(torch.tensor(res.losses)))
    # 2 steps x 2 micro-batches x 2 layers, each run twice: the forward, then again in the backward
    assert len(calls) == 2 * 2 * 2 * 2
    assert all(autocast and dtype == torch.bfloat16 for autocast, dtype in calls), calls
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert any("wandb is not installed" in m for m in logs), logs


def test_adamw8bit(tmp_path, tiny_model, chat_file, tok):
    bnb = pytest.importorskip("bitsandbytes")
    try:
        bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4096))]).step()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run here: {e}")
    r = make_recipe(tmp_path, tiny_model, chat_file, name="bnb", train_extra=", max_steps: 3, optimizer: adamw8bit")
    res = train(r, tokenizer=tok, progress=False, log=lambda m: None)
    assert res.losses[-1] < res.losses[0]


def test_hub_push_without_a_token_stops_before_training(tmp_path, tiny_model, chat_file, tok, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # as on a machine never logged in
    r = make_recipe(tmp_path, tiny_model, chat_file, extra="hub: {repo_id: me/tiny, push: true}", name="hub")
    with pytest.raises(TrainingSetupError, match="no Hugging Face token"):
        train(r, tokenizer=tok, progress=False, log=lambda m: None)
    assert not (tmp_path / "out" / "hub").exists()
