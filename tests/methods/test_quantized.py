"""Quantized bases on CPU (bitsandbytes): QLoRA nf4 / fp4 / int8, what stays in high precision, merging a
quantized run into the full-precision base, PiSSA on a 4-bit base."""
import warnings

import pytest
import torch
from torch import nn

from rwkv_peft.merge import MergeError, merge_adapters, merge_model, save_merged
from rwkv_peft.methods import (
    apply_lora, apply_state_tuning, is_quantized, load_adapter, load_base_model, save_adapter, trainable_summary,
)
from tests.factories import rel_err
from tests.methods.conftest import falling, logits, train


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_qlora_trains(quant, base_pth, batch, probe, tmp_path):
    model = load_base_model(base_pth, dtype="float32", quantization=quant, double_quant=quant == "nf4")
    assert is_quantized(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    big = "Linear4bit" if quant != "int8" else "Linear8bitLt"
    for name in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"):
        assert kinds[f"model.blocks.1.{name}"] == big
    for name in ("att.w_lora.down", "att.a_lora.up", "att.v_lora.down", "att.g_lora.up"):
        assert kinds[f"model.blocks.1.{name}"] == "Linear"  # the small decay/a/v/gate maps stay full precision
    assert kinds["head"] == "Linear" and isinstance(model.model.emb, nn.Embedding)
    assert model.model.blocks[0].att.w0.dtype == torch.float32
    full = load_base_model(base_pth, dtype="float32").get_memory_footprint()
    assert model.get_memory_footprint() < (0.5 if quant != "int8" else 0.6) * full  # it really is smaller

    full_count = trainable_summary(apply_lora(load_base_model(base_pth, dtype="float32"), r=4))
    model = apply_lora(model, r=4)
    assert trainable_summary(model) == full_count  # 4-bit weights counted unpacked
    losses = train(model, batch)
    assert falling(losses), losses
    if quant == "nf4":
        _merge_checks(model, base_pth, probe, tmp_path)


def _merge_checks(model, base_pth, probe, tmp_path):
    """A quantized run merges into the ORIGINAL full-precision weights; lossy only when asked."""
    save_adapter(model, tmp_path / "qa")
    reference = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "qa")  # fp32 base + adapter
    want = logits(reference, probe)
    merged = merge_model(model)  # reloads the fp32 base from the recorded path
    assert not is_quantized(merged)
    assert rel_err(logits(merged, probe), want) <= 1e-5
    assert rel_err(logits(merge_adapters(None, [tmp_path / "qa"]), probe), want) <= 1e-5  # base from manifest
    with pytest.raises(MergeError, match="quantized"):
        merge_adapters(load_base_model(base_pth, dtype="float32", quantization="nf4"), [tmp_path / "qa"])
    with pytest.warns(UserWarning, match="rounding errors"):  # peft re-quantizes: lossy, as asked
        lossy = merge_model(model, allow_lossy=True)
    assert is_quantized(lossy)
    with pytest.raises(MergeError, match="quantized"):
        save_merged(lossy, tmp_path / "lossy.pth")


def test_lora_and_state_on_int8(base_pth, batch):
    model = apply_state_tuning(apply_lora(load_base_model(base_pth, dtype="float32", quantization="int8"), r=4))
    losses = train(model, batch)
    assert falling(losses), losses


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_on_4bit_base(init, base_pth, batch, probe, tmp_path):
    """peft refuses PiSSA on 4-bit weights: we initialise on the fp32 weights and quantize the residual."""
    q = load_base_model(base_pth, dtype="float32", quantization="nf4")
    model = apply_lora(q, r=4, init=init)
    assert is_quantized(model) and model.peft_config["default"].init_lora_weights == init
    assert model.get_base_model()._rwkv_peft_load["path"] == str(base_pth.resolve())
    # Q(W - A0 B0) + A0 B0 stays near W (within a few quantization errors; random weights have no low-rank
    # structure for PiSSA to exploit), and the adapter carries a real part of W: without it the model is far off
    fp = logits(load_base_model(base_pth, dtype="float32"), probe)
    err = rel_err(logits(model, probe), fp)
    assert err < 2.5 * rel_err(logits(q, probe), fp)
    with model.disable_adapter():
        assert rel_err(logits(model, probe), fp) > 2 * err
    losses = train(model, batch)
    assert falling(losses), losses
    save_adapter(model, tmp_path / "qpissa")
    loaded = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "qpissa")
    merged = merge_adapters(base_pth, [tmp_path / "qpissa"])
    assert rel_err(logits(merged, probe), logits(loaded, probe)) <= 1e-5


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_an_evaluation_pass_leaves_the_4bit_gradients_alone(quant, base_pth, batch):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval-mode no-grad pass (on AVX-512 BF16 CPUs);
    training after that lost the gradient through the base weights. load_base_model keeps the trainable layout."""
    def grads(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = apply_lora(load_base_model(base_pth, dtype="float32", quantization=quant), r=4)
        for name, p in model.named_parameters():  # B = 0 would hide the gradient through the base weights
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        if evaluate_first:
            logits(model, batch)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # "...gemv_4bit: an autograd kernel was not registered"
            model(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys() and plain
    for name in plain:
        assert torch.equal(plain[name], after_eval[name]), name


def test_bad_quantization_name(base_pth):
    with pytest.raises(ValueError, match="quantization 'int4'"):
        load_base_model(base_pth, quantization="int4")


def test_device_maps_name_one_device(monkeypatch, base_pth):
    """Each rank passes device_map={"": its GPU}: a .pth base (built here, then moved) goes to that GPU; a
    quantized load without a device_map goes to GPU 0 if there is one, else the CPU."""
    from rwkv_peft.methods import loading

    assert loading._single_device({"": 1}) == "cuda:1"
    assert loading._single_device({"": 0}) == "cuda:0"
    assert loading._single_device(1) == "cuda:1"
    assert loading._single_device({"": "cpu"}) == "cpu"
    assert loading._single_device("cpu") == "cpu" and loading._single_device("cuda:1") == "cuda:1"
    assert loading._single_device(None) is None
    with pytest.raises(ValueError, match="loads onto one device"):
        loading._single_device({"model.blocks.0": 0, "head": 1})
    assert loading._default_device_map(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading._default_device_map("nf4") == "cpu" and loading._single_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading._default_device_map("nf4") == {"": 0} and loading._single_device("auto") == "cuda:0"
    monkeypatch.undo()
    # load_base_model: an unquantized .pth with {"": 1} is moved to "cuda:1" (the move needs that GPU: not done
    # here), and the device_map is recorded for later reloads
    devices, real = [], loading._build_from_state_dict
    monkeypatch.setattr(loading, "_build_from_state_dict",
                        lambda config, sd, dtype, device=None: devices.append(device) or real(config, sd, dtype))
    model = load_base_model(base_pth, dtype="float32", device_map={"": 1})
    assert devices == ["cuda:1"] and model._rwkv_peft_load["device_map"] == {"": 1}


def test_nf4_load_with_device_map_cpu(base_pth, probe):
    model = load_base_model(base_pth, dtype="float32", quantization="nf4", device_map="cpu")
    assert is_quantized(model) and model._rwkv_peft_load["device_map"] == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.isfinite(logits(model, probe)).all()
