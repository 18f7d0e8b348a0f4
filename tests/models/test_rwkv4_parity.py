"""RWKV-4's own checks: its [B, 3, A] WKV state, attention width other than the hidden size, conversion errors,
rwkv_peft.convert both ways, LoRA / QLoRA on it; state tuning refused. The parity with the official package,
generation and the .pth round trip are in test_parity.py, the transformers conventions (padding, chunked loss,
bf16) in test_conventions.py, both shared by every version."""
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import rwkv_peft  # noqa: F401  (registers every version with the Auto classes)
from rwkv_peft import versions
from rwkv_peft.models.rwkv4 import RWKV4Config, RWKV4ForCausalLM, RWKV4Model
from rwkv_peft.models.rwkv4.convert_rwkv4 import CheckpointError, blinkdl_to_hf, config_from_blinkdl
from tests.factories import make_blinkdl_v7
from tests.factories_v4 import make_blinkdl_v4, rel_err
from tests.factories_v5 import make_blinkdl_v5

TOL = 1e-5


def hf_folder(sd, folder):
    """A .pth state dict written as one of our HF folders (what ``rwkv-peft convert`` does)."""
    config, hf = blinkdl_to_hf(sd, where="test.pth")
    with torch.device("meta"):
        model = RWKV4ForCausalLM(config)
    model.load_state_dict(hf, assign=True, strict=True)
    model.save_pretrained(folder)
    return folder


# ---- conventions shared with the other versions --------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    config, hf = blinkdl_to_hf(make_blinkdl_v4(61, 64, 2, seed=5), where="small.pth")
    model = RWKV4ForCausalLM(config)
    model.load_state_dict(hf, strict=True)
    return model.eval()


def test_init_state_is_three_vectors_per_channel(small):
    """The v4 WKV state (aa, bb, pp) as [B, 3, A], pp starting at -1e30 (the shared check that it is the starting
    state is in test_parity.py)."""
    init = small.init_state(1)
    assert all(wkv.shape == (1, 3, small.config.attention_hidden_size) for _, wkv, _ in init)
    assert all(torch.equal(wkv[:, 2], torch.full_like(wkv[:, 2], -1e30)) for _, wkv, _ in init)


def test_attention_width_other_than_hidden_size_is_self_consistent():
    """A != C (``dim_att``): one pass, token by token and chunks agree, and padding leaves the state alone."""
    config, hf = blinkdl_to_hf(make_blinkdl_v4(61, 64, 2, att_width=96, seed=3), where="a96.pth")
    model = RWKV4ForCausalLM(config).eval()
    model.load_state_dict(hf, strict=True)
    x = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x, use_cache=True)
        state, steps = None, []
        for t in range(x.shape[1]):
            out = model(x[:, t:t + 1], state=state, use_cache=True)
            state = out.state
            steps.append(out.logits[:, 0])
    assert full.state[0][1].shape == (2, 3, 96)
    assert rel_err(torch.stack(steps, 1), full.logits) <= TOL
    for a, b in zip(full.state, state):
        assert all(rel_err(p, q) <= TOL for p, q in zip(a, b))


# ---- conversion ---------------------------------------------------------------------------------------------

def test_conversion_errors_name_file_and_key():
    sd = make_blinkdl_v4(61, 64, 1)
    missing = {k: v for k, v in sd.items() if k != "blocks.0.att.output.weight"}
    with pytest.raises(CheckpointError, match=r"a\.pth: missing tensor for 'model\.blocks\.0\.att\.output\.weight'"):
        blinkdl_to_hf(missing, where="a.pth")
    with pytest.raises(CheckpointError, match=r"b\.pth: unexpected key 'blocks\.0\.att\.bogus'"):
        blinkdl_to_hf({**sd, "blocks.0.att.bogus": torch.zeros(1)}, where="b.pth")
    with pytest.raises(CheckpointError, match=r"c\.pth: 'model\.blocks\.0\.ffn\.time_mix_r' has shape"):
        blinkdl_to_hf({**sd, "blocks.0.ffn.time_mix_r": torch.zeros(1, 1, 32)}, where="c.pth")
    with pytest.raises(CheckpointError, match=r"d\.pth: RWKV-7 checkpoint; this converter handles RWKV-4 only"):
        config_from_blinkdl(make_blinkdl_v7(61, 64, 1), where="d.pth")
    with pytest.raises(CheckpointError, match=r"g\.pth: RWKV-5\.2 checkpoint; this converter handles RWKV-4 only"):
        config_from_blinkdl(make_blinkdl_v5(61, 128, 1), where="g.pth")
    with pytest.raises(CheckpointError, match=r"h\.pth: key 'blocks\.0\.ffnPre\.key\.weight' belongs to a variant"):
        config_from_blinkdl({**sd, "blocks.0.ffnPre.key.weight": torch.zeros(256, 64)}, where="h.pth")
    with pytest.raises(CheckpointError, match=r"j\.pth: 'blocks\.0\.att\.time_decay' has shape \[32\]"):
        config_from_blinkdl({**sd, "blocks.0.att.time_decay": torch.zeros(32)}, where="j.pth")


def test_config_defaults_and_from_config_trains():
    cfg = RWKV4Config(hidden_size=2048, num_hidden_layers=24, vocab_size=50277)
    assert (cfg.attention_hidden_size, cfg.intermediate_size) == (2048, 8192)
    assert cfg.describe().startswith("RWKV-4 ")
    cfg = AutoConfig.for_model(RWKV4Config.model_type, vocab_size=50, hidden_size=64, num_hidden_layers=2)
    assert isinstance(cfg, RWKV4Config) and isinstance(AutoModel.from_config(cfg), RWKV4Model)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, RWKV4ForCausalLM)
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


# ---- wired into the package: registry, Auto classes, rwkv_peft.convert, load_base_model ---------------------

def test_registry_entry():
    v = versions.by_name("rwkv4")
    assert v is versions.by_blinkdl("4") and v is versions.by_model_type("rwkv4_peft") and v.title == "RWKV-4"
    assert (v.config_class, v.model_class, v.causal_lm_class) == (RWKV4Config, RWKV4Model, RWKV4ForCausalLM)
    assert v.time_mix_class.__name__ == "RWKV4TimeMix" and not v.state_tuning
    assert v.lora_presets["default"] == v.lora_presets["all"]


@pytest.mark.parametrize("att", [None, 96])
def test_convert_pth_to_folder_and_back_is_bit_identical(tmp_path, att):
    from rwkv_peft.convert import convert, load_any, save_model_pth
    sd = make_blinkdl_v4(97, 64, 2, att_width=att, seed=9)
    torch.save(sd, tmp_path / "src.pth")
    config, hf, kind = load_any(tmp_path / "src.pth")
    assert isinstance(config, RWKV4Config) and kind == "pth"
    assert "RWKV-4" in convert(tmp_path / "src.pth", tmp_path / "hf")
    assert "RWKV-4" in convert(tmp_path / "hf", tmp_path / "back.pth")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert isinstance(model, RWKV4ForCausalLM)
    save_model_pth(model, tmp_path / "saved.pth")
    for name in ("back.pth", "saved.pth"):
        back = torch.load(tmp_path / name, weights_only=True)
        assert list(back) == list(sd), name
        for k, t in sd.items():
            assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), (name, k)


def test_load_base_model_reads_v4_pth_and_folder(tmp_path):
    from rwkv_peft.methods import load_base_model
    sd = make_blinkdl_v4(97, 64, 2, seed=10)
    torch.save(sd, tmp_path / "v4.pth")
    x = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(1))
    a = load_base_model(tmp_path / "v4.pth", dtype="float32")
    b = load_base_model(hf_folder(sd, tmp_path / "hf"), dtype="float32")
    assert isinstance(a, RWKV4ForCausalLM) and isinstance(b, RWKV4ForCausalLM)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


# ---- LoRA, QLoRA; no state tuning ---------------------------------------------------------------------------

def test_v4_lora_presets(tmp_path):
    from rwkv_peft.methods import apply_lora, load_base_model
    torch.save(make_blinkdl_v4(97, 64, 1, seed=6), tmp_path / "v4.pth")
    want = {"default": {"att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value",
                        "ffn.receptance"},
            "attention": {"att.receptance", "att.key", "att.value", "att.output"},
            "ffn": {"ffn.key", "ffn.value", "ffn.receptance"}}
    want["all"] = want["default"]
    for preset, names in want.items():
        peft_model = apply_lora(load_base_model(tmp_path / "v4.pth", dtype="float32"), r=4, targets=preset)
        wrapped = {n.split("blocks.0.")[1].rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters()
                   if ".lora_A." in n}
        assert wrapped == names, (preset, wrapped)


def test_v4_lora_trains_saves_loads_merges_and_exports(tmp_path):
    from rwkv_peft.merge import merge_model, save_merged
    from rwkv_peft.methods import apply_lora, load_adapter, load_base_model, read_manifest, save_adapter
    torch.save(make_blinkdl_v4(97, 64, 2, seed=8), tmp_path / "v4.pth")
    model = apply_lora(load_base_model(tmp_path / "v4.pth", dtype="float32"), r=4)
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
    assert read_manifest(tmp_path / "adapter")["base"]["architecture"] == "rwkv4"
    loaded = load_adapter(load_base_model(tmp_path / "v4.pth", dtype="float32"), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = model.eval()(x).logits
        assert torch.equal(loaded(x).logits, want)
        merged = merge_model(loaded)
        assert rel_err(merged(x).logits, want) <= 1e-5
    save_merged(merged, tmp_path / "merged.pth")
    assert list(torch.load(tmp_path / "merged.pth", weights_only=True)) == list(make_blinkdl_v4(97, 64, 2, seed=8))
    again = load_base_model(tmp_path / "merged.pth", dtype="float32").eval()
    assert isinstance(again, RWKV4ForCausalLM)
    with torch.no_grad():
        assert rel_err(again(x).logits, want) <= 1e-5


def test_v4_adapter_refuses_a_v5_base(tmp_path):
    from rwkv_peft.methods import AdapterMismatchError, apply_lora, load_adapter, load_base_model, save_adapter
    torch.save(make_blinkdl_v4(97, 128, 2, seed=8), tmp_path / "v4.pth")
    torch.save(make_blinkdl_v5(97, 128, 2, seed=8), tmp_path / "v5.pth")
    save_adapter(apply_lora(load_base_model(tmp_path / "v4.pth", dtype="float32"), r=4), tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="architecture differs: the adapter was trained on rwkv4"):
        load_adapter(load_base_model(tmp_path / "v5.pth", dtype="float32"), tmp_path / "adapter")


def test_v4_quantized_base_trains_a_lora(tmp_path):
    import bitsandbytes as bnb

    from rwkv_peft.methods import apply_lora, load_base_model
    torch.save(make_blinkdl_v4(97, 64, 2, seed=5), tmp_path / "v4.pth")
    model = load_base_model(tmp_path / "v4.pth", dtype="float32", quantization="nf4")
    att = model.model.blocks[0].att
    assert isinstance(att.receptance, bnb.nn.Linear4bit) and not isinstance(model.head, bnb.nn.Linear4bit)
    assert att.time_decay.dtype == torch.float32 and att.time_first.dtype == torch.float32
    peft_model = apply_lora(model, r=4)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    before = peft_model(x, labels=x).loss
    before.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters()
               if "lora_B" in n)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        assert torch.isfinite(before) and peft_model(x, labels=x).loss < before


def test_state_tuning_is_refused_for_v4(small):
    from rwkv_peft.tuners.state_tuning import StateMismatchError, apply_state_tuning, time_mixes
    with pytest.raises(StateMismatchError, match=r"state tuning is wired in for .* so far; this is a RWKV-4 model"):
        time_mixes(small)
    with pytest.raises(StateMismatchError, match="this is a RWKV-4 model"):
        apply_state_tuning(RWKV4ForCausalLM(small.config))
