"""RWKV-6's own checks: conversion errors, config defaults, LoRA / QLoRA. The parity with the official package,
generation and the .pth round trip are in test_parity.py, the transformers conventions (padding, chunked loss,
bf16) in test_conventions.py, both shared by every version."""
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rwkv_peft.models.rwkv6 import RWKV6Config, RWKV6ForCausalLM, RWKV6Model
from rwkv_peft.models.rwkv6.convert_rwkv6 import CheckpointError, blinkdl_to_hf, config_from_blinkdl
from tests.factories import make_blinkdl_v7
from tests.factories_v6 import make_blinkdl_v6


def register():
    AutoConfig.register(RWKV6Config.model_type, RWKV6Config, exist_ok=True)
    AutoModel.register(RWKV6Config, RWKV6Model, exist_ok=True)
    AutoModelForCausalLM.register(RWKV6Config, RWKV6ForCausalLM, exist_ok=True)


# ---- conversion ---------------------------------------------------------------------------------------------

def test_conversion_errors_name_file_and_key():
    sd = make_blinkdl_v6(61, 128, 1)
    missing = {k: v for k, v in sd.items() if k != "blocks.0.att.gate.weight"}
    with pytest.raises(CheckpointError, match=r"a\.pth: missing tensor for 'model\.blocks\.0\.att\.gate\.weight'"):
        blinkdl_to_hf(missing, where="a.pth")
    with pytest.raises(CheckpointError, match=r"b\.pth: unexpected key 'blocks\.0\.att\.bogus'"):
        blinkdl_to_hf({**sd, "blocks.0.att.bogus": torch.zeros(1)}, where="b.pth")
    bad = {**sd, "blocks.0.att.time_decay_w2": torch.zeros(63, 128)}
    with pytest.raises(CheckpointError, match=r"c\.pth: 'model\.blocks\.0\.att\.decay_lora\.up\.weight' has shape"):
        blinkdl_to_hf(bad, where="c.pth")
    with pytest.raises(CheckpointError, match=r"d\.pth: RWKV-7 checkpoint; this converter handles RWKV-6 only"):
        config_from_blinkdl(make_blinkdl_v7(61, 64, 1), where="d.pth")
    with pytest.raises(CheckpointError, match=r"f\.pth: RWKV-6 checkpoint: missing key 'blocks\.0\.att\.time_faaaa'"):
        config_from_blinkdl({"emb.weight": torch.zeros(5, 4), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 4)},
                            where="f.pth")
    with pytest.raises(CheckpointError, match=r"e\.pth: .*no RWKV block keys"):
        config_from_blinkdl({"emb.weight": torch.zeros(3, 4)}, where="e.pth")


def test_config_defaults_from_width():
    cfg = RWKV6Config(hidden_size=2048, num_hidden_layers=24)
    assert (cfg.num_heads, cfg.intermediate_size, cfg.mix_low_rank, cfg.decay_low_rank) == (32, 7168, 32, 64)
    assert (RWKV6Config(hidden_size=4096).mix_low_rank, RWKV6Config(hidden_size=4096).decay_low_rank) == (64, 128)
    assert cfg.head_norm_eps == pytest.approx(64e-5)
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKV6Config(hidden_size=100)


def test_from_config_trains():
    register()
    cfg = AutoConfig.for_model(RWKV6Config.model_type, vocab_size=50, hidden_size=64, num_hidden_layers=2)
    assert isinstance(AutoModel.from_config(cfg), RWKV6Model)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, RWKV6ForCausalLM)
    x = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_v6_quantized_base_keeps_low_rank_maps_in_full_precision(tmp_path):
    import bitsandbytes as bnb

    from rwkv_peft.methods import apply_lora, load_base_model
    from tests.factories_v6 import make_blinkdl_v6
    torch.save(make_blinkdl_v6(97, 128, 2, seed=5), tmp_path / "v6.pth")
    model = load_base_model(tmp_path / "v6.pth", dtype="float32", quantization="nf4")
    att = model.model.blocks[0].att
    assert isinstance(att.receptance, bnb.nn.Linear4bit)
    assert not isinstance(att.decay_lora.down, bnb.nn.Linear4bit)
    assert not isinstance(att.maa_lora.down, bnb.nn.Linear4bit)
    peft_model = apply_lora(model, r=4)
    x = torch.randint(0, 97, (1, 12))
    assert torch.isfinite(peft_model(x, labels=x).loss)


def test_v6_lora_presets_cover_gate_and_ffn_receptance(tmp_path):
    from rwkv_peft.methods import apply_lora, load_base_model
    from tests.factories_v6 import make_blinkdl_v6
    torch.save(make_blinkdl_v6(97, 128, 1, seed=6), tmp_path / "v6.pth")
    for preset, must in (("default", {"att.gate", "ffn.receptance", "att.output"}),
                         ("all", {"att.decay_lora.up", "att.maa_lora.down"})):
        peft_model = apply_lora(load_base_model(tmp_path / "v6.pth", dtype="float32"), r=4, targets=preset)
        wrapped = {n.split("blocks.0.")[1].rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters()
                   if ".lora_A." in n}
        assert must <= wrapped, (preset, wrapped)


def test_v6_lora_adapter_saves_loads_merges_and_exports(tmp_path):
    from rwkv_peft.merge import merge_model, save_merged
    from rwkv_peft.methods import apply_lora, load_adapter, load_base_model, read_manifest, save_adapter
    from tests.factories import rel_err
    from tests.factories_v6 import make_blinkdl_v6
    torch.save(make_blinkdl_v6(97, 128, 2, seed=8), tmp_path / "v6.pth")
    model = apply_lora(load_base_model(tmp_path / "v6.pth", dtype="float32"), r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter")
    assert read_manifest(tmp_path / "adapter")["base"]["architecture"] == "rwkv6"
    x = torch.randint(0, 97, (1, 15))
    loaded = load_adapter(load_base_model(tmp_path / "v6.pth", dtype="float32"), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = model.eval()(x).logits
        assert torch.equal(loaded(x).logits, want)
        merged = merge_model(loaded)
        assert rel_err(merged(x).logits, want) <= 1e-5
    save_merged(merged, tmp_path / "merged.pth")
    again = load_base_model(tmp_path / "merged.pth", dtype="float32").eval()
    with torch.no_grad():
        assert rel_err(again(x).logits, want) <= 1e-5


def test_v6_adapter_refuses_a_v7_base(tmp_path):
    import pytest

    from rwkv_peft.methods import AdapterMismatchError, apply_lora, load_adapter, load_base_model, save_adapter
    from tests.factories import make_blinkdl_v7
    from tests.factories_v6 import make_blinkdl_v6
    torch.save(make_blinkdl_v6(97, 128, 2, seed=8), tmp_path / "v6.pth")
    torch.save(make_blinkdl_v7(97, 128, 2, seed=8), tmp_path / "v7.pth")
    save_adapter(apply_lora(load_base_model(tmp_path / "v6.pth", dtype="float32"), r=4), tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="architecture differs: the adapter was trained on rwkv6"):
        load_adapter(load_base_model(tmp_path / "v7.pth", dtype="float32"), tmp_path / "adapter")
