"""State tuning (our tuner beside peft): train the initial WKV states only, save, load, runtime format."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from rwkv_peft.methods import (
    apply_lora, apply_state_tuning, export_state_pth, get_states, load_adapter, load_base_model,
    load_state_pth, save_adapter, trainable_summary,
)
from rwkv_peft.methods.loading import is_quantized
from rwkv_peft.tuners.state_tuning import STATE_FILE, StateMismatchError, add_initial_state, read_state_file
from tests.methods.conftest import falling, logits, train


def test_state_only_trains_and_freezes_the_rest(base_pth, batch):
    model = load_base_model(base_pth, dtype="float32")
    assert model.model.blocks[0].att.time_state is None  # a checkpoint without a state
    apply_state_tuning(model)
    assert model.config.use_initial_state
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.blocks.{i}.att.time_state" for i in range(2)]
    assert "[state: 16,384]" in trainable_summary(model)  # 2 layers x 2 x 64 x 64
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, batch, steps=6, lr=0.05)
    assert falling(losses), losses
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert model.model.blocks[1].att.time_state.abs().max() > 0


def test_state_changes_generate_and_round_trips(base_pth, batch, probe, tmp_path):
    model = apply_state_tuning(load_base_model(base_pth, dtype="float32"))
    prompt = probe[:, :4]
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain_out = model.generate(prompt, **gen)
    with torch.no_grad():
        for i, m in enumerate(model.model.blocks):
            m.att.time_state.copy_(torch.randn(m.att.time_state.shape, generator=torch.Generator().manual_seed(i)) * 3)
    tuned_out = model.generate(prompt, **gen)
    assert not torch.equal(plain_out, tuned_out)
    want = logits(model, probe)

    save_adapter(model, tmp_path / "adapter")
    manifest = json.loads((tmp_path / "adapter" / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"] == {"lora": False, "state": True}
    with safe_open(str(tmp_path / "adapter" / STATE_FILE), framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "rwkv7" and meta["layers"] == "2" and meta["heads"] == "2"
    assert meta["head_size"] == "64" and meta["layout"] == "[H, N(value), N(key)]"

    loaded = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, probe), want)
    assert torch.equal(loaded.generate(prompt, **gen), tuned_out)

    # runtime format: blocks.N.att.time_state [H, N, N], read back exactly, and usable as a state init
    export_state_pth(model, tmp_path / "state.pth")
    raw = torch.load(tmp_path / "state.pth", weights_only=True)
    assert sorted(raw) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert raw["blocks.0.att.time_state"].shape == (2, 64, 64)
    for a, b in zip(load_state_pth(tmp_path / "state.pth"), get_states(model)):
        assert torch.equal(a, b)
    again = apply_state_tuning(load_base_model(base_pth, dtype="float32"), init=tmp_path / "state.pth")
    assert torch.equal(logits(again, probe), want)


def test_state_is_the_sequence_start(base_pth, probe):
    """The learned state acts exactly as a state passed in explicitly."""
    model = apply_state_tuning(load_base_model(base_pth, dtype="float32"))
    with torch.no_grad():
        for m in model.model.blocks:
            m.att.time_state.normal_(0, 0.5)
    want = logits(model, probe)
    state = model.init_state(1)
    plain = load_base_model(base_pth, dtype="float32")
    with torch.no_grad():
        got = plain(input_ids=probe, state=state).logits
    assert torch.equal(got, want)


def test_lora_and_state_in_one_run(base_pth, batch, probe, tmp_path):
    model = apply_state_tuning(apply_lora(load_base_model(base_pth, dtype="float32"), r=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(n.endswith("time_state") for n in names)
    assert all("lora_" in n or n.endswith("time_state") for n in names)
    losses = train(model, batch)
    assert falling(losses), losses
    want = logits(model, probe)
    save_adapter(model, tmp_path / "both")
    files = {p.name for p in (tmp_path / "both").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", STATE_FILE, "rwkv_peft_adapter.json"} <= files
    loaded = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "both")
    assert isinstance(loaded, PeftModel)
    assert torch.equal(logits(loaded, probe), want)
    # trainable reload: both parts train again
    again = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "both", is_trainable=True)
    names = [n for n, p in again.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(n.endswith("time_state") for n in names)


def test_state_before_lora_stays_trainable(base_pth):
    model = apply_lora(apply_state_tuning(load_base_model(base_pth, dtype="float32")), r=2)
    assert all(m.att.time_state.requires_grad for m in model.get_base_model().model.blocks)


def test_state_on_quantized_base(base_pth, batch, tmp_path, probe):
    model = load_base_model(base_pth, dtype="float32", quantization="nf4", trainable_initial_state=True)
    assert is_quantized(model) and model.model.blocks[0].att.time_state.dtype == torch.float32
    apply_state_tuning(model)
    losses = train(model, batch, lr=0.05)
    assert falling(losses), losses
    save_adapter(model, tmp_path / "q")
    loaded = load_adapter(load_base_model(base_pth, dtype="float32", quantization="nf4"), tmp_path / "q")
    assert torch.equal(logits(loaded, probe), logits(model, probe))


def test_add_initial_state_and_mismatch(base_pth, tmp_path):
    model = load_base_model(base_pth, dtype="bfloat16")
    add_initial_state(model)
    assert model.model.blocks[0].att.time_state.dtype == torch.float32
    bad = [torch.zeros(3, 64, 64)] * 2
    export_state_pth(bad, tmp_path / "bad_heads.pth")
    with pytest.raises(StateMismatchError, match="heads differ: the state has 3 heads, the model 2"):
        apply_state_tuning(model, init=tmp_path / "bad_heads.pth")
    export_state_pth([torch.zeros(2, 64, 64)] * 3, tmp_path / "bad_layers.pth")
    with pytest.raises(StateMismatchError, match="layers differ: the state has 3 layers, the model 2"):
        apply_state_tuning(model, init=tmp_path / "bad_layers.pth")
    export_state_pth([torch.zeros(4, 32, 32)] * 2, tmp_path / "bad_n.pth")
    with pytest.raises(StateMismatchError, match="heads differ|head size"):
        apply_state_tuning(model, init=tmp_path / "bad_n.pth")
    with pytest.raises(ValueError, match="state init"):
        apply_state_tuning(model, init="ones")


def test_state_file_metadata_is_checked(tmp_path):
    from safetensors.torch import save_file
    save_file({"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, str(tmp_path / "s.safetensors"),
              metadata={"architecture": "rwkv7", "layers": "4"})
    with pytest.raises(StateMismatchError, match="layers differ: metadata says 4, tensors give 1"):
        read_state_file(tmp_path / "s.safetensors")
    save_file({"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, str(tmp_path / "v4.safetensors"),
              metadata={"architecture": "rwkv4"})  # a version without a matrix state
    with pytest.raises(StateMismatchError, match="architecture differs: the file says 'rwkv4'"):
        read_state_file(tmp_path / "v4.safetensors")
    # a RWKV-6 state reads, with its version (tests/methods/test_state_tuning_versions.py puts it on models)
    save_file({"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, str(tmp_path / "v6.safetensors"),
              metadata={"architecture": "rwkv6"})
    assert read_state_file(tmp_path / "v6.safetensors")[1]["architecture"] == "rwkv6"


def test_state_with_lora_in_generate_and_bf16(base_pth, batch, probe):
    """generate() of a PeftModel starts from the state too; bf16 base + fp32 state + LoRA trains."""
    model = apply_state_tuning(apply_lora(load_base_model(base_pth, dtype="bfloat16"), r=4))
    assert model.get_base_model().model.blocks[0].att.time_state.dtype == torch.float32
    prompt = probe[:, :4]
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = model.generate(input_ids=prompt, **gen)
    with torch.no_grad():
        for m in model.get_base_model().model.blocks:
            m.att.time_state.normal_(0, 3.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(before, model.generate(input_ids=prompt, **gen))
    with torch.no_grad():
        for m in model.get_base_model().model.blocks:
            m.att.time_state.zero_()
    losses = train(model, batch, lr=0.02)
    assert falling(losses), losses
