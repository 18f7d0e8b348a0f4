"""RWKV-5.2's own checks: conversion errors (RWKV-5.1 refused), config defaults, rwkv_peft.convert both ways, the
LoRA / QLoRA. The parity with
the official package, generation and the .pth round trip are in test_parity.py, shared by every version."""
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rwkv_peft.models.rwkv5 import RWKV5Config, RWKV5ForCausalLM, RWKV5Model
from rwkv_peft.models.rwkv5.convert_rwkv5 import CheckpointError, blinkdl_to_hf, config_from_blinkdl
from tests.factories import make_blinkdl_v7
from tests.factories_v6 import make_blinkdl_v6
from tests.factories_v5 import make_blinkdl_v5, rel_err


def register():
    AutoConfig.register(RWKV5Config.model_type, RWKV5Config, exist_ok=True)
    AutoModel.register(RWKV5Config, RWKV5Model, exist_ok=True)
    AutoModelForCausalLM.register(RWKV5Config, RWKV5ForCausalLM, exist_ok=True)


def hf_folder(sd, folder):
    """A .pth state dict written as one of our HF folders (what ``rwkv-peft convert`` will do)."""
    config, hf = blinkdl_to_hf(sd, where="test.pth")
    with torch.device("meta"):
        model = RWKV5ForCausalLM(config)
    model.load_state_dict(hf, assign=True, strict=True)
    model.save_pretrained(folder)
    return folder


# ---- conversion ---------------------------------------------------------------------------------------------

def test_conversion_errors_name_file_and_key():
    sd = make_blinkdl_v5(61, 128, 1)
    missing = {k: v for k, v in sd.items() if k != "blocks.0.att.gate.weight"}
    with pytest.raises(CheckpointError, match=r"a\.pth: missing tensor for 'model\.blocks\.0\.att\.gate\.weight'"):
        blinkdl_to_hf(missing, where="a.pth")
    with pytest.raises(CheckpointError, match=r"b\.pth: unexpected key 'blocks\.0\.att\.bogus'"):
        blinkdl_to_hf({**sd, "blocks.0.att.bogus": torch.zeros(1)}, where="b.pth")
    bad = {**sd, "blocks.0.ffn.time_mix_r": torch.zeros(1, 1, 64)}
    with pytest.raises(CheckpointError, match=r"c\.pth: 'model\.blocks\.0\.ffn\.time_mix_r' has shape"):
        blinkdl_to_hf(bad, where="c.pth")
    with pytest.raises(CheckpointError, match=r"d\.pth: RWKV-7 checkpoint; this converter handles RWKV-5\.2 only"):
        config_from_blinkdl(make_blinkdl_v7(61, 64, 1), where="d.pth")
    with pytest.raises(CheckpointError, match=r"g\.pth: RWKV-6 checkpoint; this converter handles RWKV-5\.2 only"):
        config_from_blinkdl(make_blinkdl_v6(61, 128, 1), where="g.pth")
    v51 = {**sd, "blocks.0.att.time_decay": torch.zeros(2)}  # RWKV-5.1: one decay per head
    with pytest.raises(CheckpointError, match=r"h\.pth: RWKV-5\.1 checkpoint; this converter handles RWKV-5\.2 only"):
        config_from_blinkdl(v51, where="h.pth")
    old = {("blocks.0.att.time_first" if k == "blocks.0.att.time_faaaa" else k): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"i\.pth: 'blocks\.0\.att\.time_first' \(u = exp\(time_first\)\)"):
        config_from_blinkdl(old, where="i.pth")
    with pytest.raises(CheckpointError, match=r"j\.pth: 'blocks\.0\.att\.time_decay' has shape \[4, 32\]"):
        config_from_blinkdl({**sd, "blocks.0.att.time_decay": torch.zeros(4, 32), "emb.weight": torch.zeros(5, 100)},
                            where="j.pth")
    with pytest.raises(CheckpointError, match=r"e\.pth: .*no RWKV block keys"):
        config_from_blinkdl({"emb.weight": torch.zeros(3, 4)}, where="e.pth")


def test_config_defaults_from_width():
    cfg = RWKV5Config(hidden_size=2048, num_hidden_layers=24)
    assert (cfg.num_heads, cfg.intermediate_size) == (32, 7168)
    assert cfg.head_norm_eps == pytest.approx(64e-5)
    assert cfg.describe().startswith("RWKV-5.2 ")
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKV5Config(hidden_size=100)


def test_from_config_trains():
    register()
    cfg = AutoConfig.for_model(RWKV5Config.model_type, vocab_size=50, hidden_size=64, num_hidden_layers=2)
    assert isinstance(AutoModel.from_config(cfg), RWKV5Model)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, RWKV5ForCausalLM)
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




# ---- wired into the package: Auto classes, rwkv_peft.convert, load_base_model ------------------------------

def test_package_import_registers_auto_classes():
    import rwkv_peft  # noqa: F401  (registers every version)
    cfg = AutoConfig.for_model("rwkv5_peft", vocab_size=50, hidden_size=64, num_hidden_layers=1)
    assert isinstance(cfg, RWKV5Config)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), RWKV5ForCausalLM)


@pytest.mark.parametrize("time_state", [False, True])
def test_convert_pth_to_folder_and_back_is_bit_identical(tmp_path, time_state):
    from rwkv_peft.convert import convert, load_any, save_model_pth
    sd = make_blinkdl_v5(97, 128, 2, seed=9, time_state=time_state)
    torch.save(sd, tmp_path / "src.pth")
    config, hf, kind = load_any(tmp_path / "src.pth")
    assert isinstance(config, RWKV5Config) and kind == "pth"
    assert "RWKV-5.2" in convert(tmp_path / "src.pth", tmp_path / "hf")
    assert "RWKV-5.2" in convert(tmp_path / "hf", tmp_path / "back.pth")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert isinstance(model, RWKV5ForCausalLM)
    save_model_pth(model, tmp_path / "saved.pth")
    for name in ("back.pth", "saved.pth"):
        back = torch.load(tmp_path / name, weights_only=True)
        assert list(back) == list(sd), name
        for k, t in sd.items():
            assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), (name, k)


def test_convert_refuses_rwkv5_1(tmp_path):
    from rwkv_peft.convert import load_any
    sd = make_blinkdl_v5(61, 128, 1)
    sd = {k: (v.reshape(2, 64)[:, 0].clone() if k.endswith("time_decay") else v) for k, v in sd.items()}
    torch.save(sd, tmp_path / "v51.pth")
    with pytest.raises(CheckpointError, match=r"v51\.pth: RWKV-5\.1 checkpoint; supported: RWKV-7, RWKV-6, RWKV-5\.2"):
        load_any(tmp_path / "v51.pth")


def test_load_base_model_reads_v5_pth_and_folder(tmp_path):
    from rwkv_peft.methods import load_base_model
    sd = make_blinkdl_v5(97, 128, 2, seed=10)
    torch.save(sd, tmp_path / "v5.pth")
    x = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(1))
    a = load_base_model(tmp_path / "v5.pth", dtype="float32")
    b = load_base_model(hf_folder(sd, tmp_path / "hf"), dtype="float32")
    assert isinstance(a, RWKV5ForCausalLM) and isinstance(b, RWKV5ForCausalLM)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


# ---- LoRA ---------------------------------------------------------------------------------------------------

def test_v5_lora_presets_cover_gate_and_ffn_receptance(tmp_path):
    from rwkv_peft.methods import apply_lora, load_base_model
    torch.save(make_blinkdl_v5(97, 128, 1, seed=6), tmp_path / "v5.pth")
    for preset in ("default", "all"):
        peft_model = apply_lora(load_base_model(tmp_path / "v5.pth", dtype="float32"), r=4, targets=preset)
        wrapped = {n.split("blocks.0.")[1].rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters()
                   if ".lora_A." in n}
        assert wrapped == {"att.receptance", "att.key", "att.value", "att.output", "att.gate", "ffn.key",
                           "ffn.value", "ffn.receptance"}, (preset, wrapped)


def test_v5_lora_trains_saves_loads_merges_and_exports(tmp_path):
    from rwkv_peft.merge import merge_model, save_merged
    from rwkv_peft.methods import apply_lora, load_adapter, load_base_model, read_manifest, save_adapter
    torch.save(make_blinkdl_v5(97, 128, 2, seed=8), tmp_path / "v5.pth")
    model = apply_lora(load_base_model(tmp_path / "v5.pth", dtype="float32"), r=4)
    x = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(3))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    before = model(x, labels=x).loss
    before.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        assert model(x, labels=x).loss < before  # one step on the batch lowers its loss
    save_adapter(model, tmp_path / "adapter")
    assert read_manifest(tmp_path / "adapter")["base"]["architecture"] == "rwkv5"
    loaded = load_adapter(load_base_model(tmp_path / "v5.pth", dtype="float32"), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = model.eval()(x).logits
        assert torch.equal(loaded(x).logits, want)
        merged = merge_model(loaded)
        assert rel_err(merged(x).logits, want) <= 1e-5
    save_merged(merged, tmp_path / "merged.pth")
    again = load_base_model(tmp_path / "merged.pth", dtype="float32").eval()
    assert isinstance(again, RWKV5ForCausalLM)
    with torch.no_grad():
        assert rel_err(again(x).logits, want) <= 1e-5


def test_v5_adapter_refuses_a_v6_base(tmp_path):
    from rwkv_peft.methods import AdapterMismatchError, apply_lora, load_adapter, load_base_model, save_adapter
    torch.save(make_blinkdl_v5(97, 128, 2, seed=8), tmp_path / "v5.pth")
    torch.save(make_blinkdl_v6(97, 128, 2, seed=8), tmp_path / "v6.pth")
    save_adapter(apply_lora(load_base_model(tmp_path / "v5.pth", dtype="float32"), r=4), tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="architecture differs: the adapter was trained on rwkv5"):
        load_adapter(load_base_model(tmp_path / "v6.pth", dtype="float32"), tmp_path / "adapter")


def test_v5_quantized_base_trains_a_lora(tmp_path):
    import bitsandbytes as bnb

    from rwkv_peft.methods import apply_lora, load_base_model
    torch.save(make_blinkdl_v5(97, 128, 2, seed=5), tmp_path / "v5.pth")
    model = load_base_model(tmp_path / "v5.pth", dtype="float32", quantization="nf4")
    att = model.model.blocks[0].att
    assert isinstance(att.receptance, bnb.nn.Linear4bit) and not isinstance(model.head, bnb.nn.Linear4bit)
    assert att.time_decay.dtype == torch.float32
    peft_model = apply_lora(model, r=4)
    x = torch.randint(0, 97, (1, 12))
    loss = peft_model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
