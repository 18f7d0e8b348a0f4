"""LoRA and its variants through peft on a tiny RWKV-7: train, save/load, merge, presets."""
import json

import pytest
import torch
from peft import PeftModel

from rwkv_peft.merge import merge_adapters, merge_model
from rwkv_peft.methods import (
    TARGET_PRESETS, apply_lora, load_adapter, load_base_model, save_adapter, trainable_summary,
)
from rwkv_peft.quiet import peft_wrapping
from tests.factories import rel_err
from tests.methods.conftest import falling, logits, train

CASES = {
    "lora": dict(),
    "dora": dict(variant="dora"),
    "rslora": dict(variant="rslora"),
    "pissa": dict(init="pissa"),
    "olora": dict(init="olora"),
    "gaussian": dict(init="gaussian"),
    "all+modules_to_save": dict(targets="all", modules_to_save=["ln_out", "head"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_saves_loads_merges(name, base_pth, batch, probe, tmp_path):
    kw = CASES[name]
    model = apply_lora(load_base_model(base_pth, dtype="float32"), r=4, alpha=8, **kw)
    assert isinstance(model, PeftModel)
    assert "lora:" in trainable_summary(model)
    losses = train(model, batch)
    assert falling(losses), losses
    want = logits(model, probe)

    save_adapter(model, tmp_path / "adapter")
    manifest = json.loads((tmp_path / "adapter" / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"] == {"lora": True, "state": False}
    assert manifest["base"]["num_hidden_layers"] == 2 and manifest["base"]["path"] == str(base_pth.resolve())

    # one call, and a plain peft load of the same folder (a standard peft adapter)
    loaded = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "adapter")
    with peft_wrapping():  # transformers 5.23+ warns about peft's read of is_gradient_checkpointing
        plain = PeftModel.from_pretrained(load_base_model(base_pth, dtype="float32"), str(tmp_path / "adapter"))
    exact = kw.get("init") not in ("pissa", "olora")  # those are saved converted to a rank-2r plain LoRA
    for m in (loaded, plain):
        got = logits(m, probe)
        assert torch.equal(got, want) if exact else rel_err(got, want) <= 1e-5

    merged = merge_adapters(base_pth, [tmp_path / "adapter"])
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert rel_err(logits(merged, probe), want) <= 1e-5
    assert rel_err(logits(merge_model(model), probe), want) <= 1e-5


def test_converted_pissa_manifest(base_pth, batch, tmp_path):
    model = apply_lora(load_base_model(base_pth, dtype="float32"), r=4, init="pissa")
    train(model, batch, steps=2)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    manifest = json.loads((tmp_path / "a" / "rwkv_peft_adapter.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert manifest["lora"]["converted_to_plain_lora"] == {"from": "pissa", "rank": 8}
    assert not (tmp_path / "a" / "initial_adapter").exists()


@pytest.mark.parametrize("preset", list(TARGET_PRESETS))
def test_target_presets(preset, base_pth):
    model = apply_lora(load_base_model(base_pth, dtype="float32"), r=2, targets=preset)

    def wrapped(block):
        return sorted({n.split(f"model.blocks.{block}.", 1)[1].rsplit(".lora_A", 1)[0]
                       for n, _ in model.named_parameters() if f"blocks.{block}." in n and ".lora_A." in n})

    assert wrapped(1) == sorted(TARGET_PRESETS[preset])
    # layer 0's v_lora never reaches the loss (its value residual is itself): never targeted (NEVER_TARGETED)
    assert wrapped(0) == sorted(t for t in TARGET_PRESETS[preset] if not t.startswith("att.v_lora."))


def test_explicit_targets_and_errors(base_pth):
    model = apply_lora(load_base_model(base_pth, dtype="float32"), r=2, targets=["att.key", "head"])
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("head") for n in names) and any(n.endswith("att.key") for n in names)
    assert not any(n.endswith("ffn.key") for n in names)
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(load_base_model(base_pth, dtype="float32"), targets=["q_proj"])
    with pytest.raises(ValueError, match="preset"):
        apply_lora(load_base_model(base_pth, dtype="float32"), targets="everything")
    with pytest.raises(ValueError, match="variant"):
        apply_lora(load_base_model(base_pth, dtype="float32"), variant="vera")


def test_hf_folder_base(base_hf, base_pth, probe):
    a = load_base_model(base_hf, dtype="float32")
    b = load_base_model(base_pth, dtype="float32")
    assert torch.equal(logits(a, probe), logits(b, probe))
    assert a._rwkv_peft_load["path"] == str(base_hf.resolve())
