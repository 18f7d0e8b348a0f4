"""MiSS through peft (variants, fit checks, with state tuning, save/load, merge rules) and LoRA's per-module
rank_pattern / alpha_pattern, on the tiny RWKV-7 of conftest (width 128, ffn 512, low-rank maps 32)."""
import json

import pytest
import torch

from rwkv_peft.merge import MergeError, merge_adapters, save_merged
from rwkv_peft.methods import (
    AdapterMismatchError, MissFitError, apply_lora, apply_miss, apply_state_tuning, load_adapter, load_base_model, save_adapter,
    trainable_summary,
)
from tests.factories import rel_err
from tests.methods.conftest import falling, logits, train


def blocks(model):
    return {n.split("model.blocks.", 1)[1].rsplit(".miss_block", 1)[0]: tuple(p.shape)
            for n, p in model.named_parameters() if ".miss_block." in n}


@pytest.mark.parametrize("variant,kw,shape", [("balance", {}, {"att.key": (16, 128), "ffn.key": (16, 512),
                                                                 "ffn.value": (16, 128)}),
                                               ("bat", {}, {"att.key": (8, 16, 16), "ffn.key": (32, 16, 16),
                                                            "ffn.value": (8, 16, 16)}),
                                               ("mini", {"mini_r": 32}, {"att.key": (16, 32), "ffn.key": (16, 32),
                                                                         "ffn.value": (16, 32)})])
def test_variants_wrap_the_preset_with_their_block_shapes(variant, kw, shape, base_pth):
    model = apply_miss(load_base_model(base_pth, dtype="float32"), r=16, variant=variant, **kw)
    got = blocks(model)
    assert sorted(n for n in got if n.startswith("1.")) == sorted(f"1.{t}" for t in
                                                                  ["att.receptance", "att.key", "att.value",
                                                                   "att.output", "ffn.key", "ffn.value"])
    for module, want in shape.items():
        assert got[f"1.{module}"] == want
    assert all(p.requires_grad == (".miss_block." in n) for n, p in model.named_parameters())


def test_fit_errors_name_the_module(base_pth):
    base = load_base_model(base_pth, dtype="float32")
    with pytest.raises(MissFitError, match=r"r=64 does not fit model\.blocks\.0\.att\.w_lora\.up \(in_features 32\)"):
        apply_miss(base, r=64, targets="all")
    with pytest.raises(MissFitError, match=r"'bat' with r=48 does not fit .*att\.receptance \[128 x 128\]"):
        apply_miss(base, r=48, variant="bat")
    with pytest.raises(MissFitError, match=r"mini_r=48 does not fit .*att\.receptance \(out_features 128\)"):
        apply_miss(base, r=16, variant="mini", mini_r=48)
    with pytest.raises(ValueError, match="MiSS target 'q_proj' matches no module"):
        apply_miss(base, targets=["q_proj"])
    with pytest.raises(ValueError, match="needs mini_r"):
        apply_miss(base, variant="mini")
    # r above in_features of the small maps only: fine on the default preset
    apply_miss(base, r=64)


def test_miss_plus_state_saves_reloads_and_merges(base_pth, batch, probe, tmp_path):
    model = apply_miss(apply_state_tuning(load_base_model(base_pth, dtype="float32")), r=16)
    summary = trainable_summary(model)
    assert "miss: " in summary and "state: " in summary, summary
    assert falling(train(model, batch, steps=5, lr=1e-2))
    want = logits(model, probe)
    save_adapter(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"] == {"lora": False, "miss": True, "state": True}
    assert manifest["miss"]["variant"] == "balance" and manifest["miss"]["peft_type"] == "MISS"
    again = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "a")
    assert torch.equal(logits(again, probe), want)
    assert again.get_base_model()._rwkv_miss["r"] == 16
    # trainable reload: the MiSS blocks and the states train again
    trainable = load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "a", is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert any(".miss_block." in n for n in names) and any(n.endswith("time_state") for n in names)
    # a folder whose blocks do not fit what its config says is refused before peft loads it
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "init_weights": "mini", "mini_r": 8}))
    with pytest.raises(AdapterMismatchError, match=r"MiSS block is \[16, 128\], .* needs \[16, 8\]"):
        load_adapter(load_base_model(base_pth, dtype="float32"), tmp_path / "bad")

    with pytest.raises(MergeError, match="still has LoRA / MiSS layers"):
        save_merged(again.get_base_model(), tmp_path / "x.pth")
    merged = merge_adapters(base_pth, [tmp_path / "a"])
    assert rel_err(logits(merged, probe), want) <= 1e-5
    # peft combines only LoRA adapters with weights
    with pytest.raises(MergeError, match="only LoRA adapters can be combined"):
        merge_adapters(base_pth, [tmp_path / "a", tmp_path / "a"], weights=[0.5, 0.5])


def test_lora_rank_and_alpha_patterns(base_pth):
    model = apply_lora(load_base_model(base_pth, dtype="float32"), r=4, alpha=8,
                       rank_pattern={"blocks.0.att.key": 8, r"blocks\.1\.ffn\.(key|value)": 2},
                       alpha_pattern={"att.value": 3})
    shapes = {n.split("model.blocks.", 1)[1].rsplit(".lora_A", 1)[0]: tuple(p.shape)
              for n, p in model.named_parameters() if ".lora_A." in n}
    assert shapes["0.att.key"] == (8, 128) and shapes["1.att.key"] == (4, 128)
    assert shapes["1.ffn.key"] == (2, 128) and shapes["1.ffn.value"] == (2, 512) and shapes["0.ffn.key"] == (4, 128)
    scaling = {n.split("model.blocks.", 1)[1]: m.scaling["default"] for n, m in model.named_modules()
               if hasattr(m, "scaling") and "model.blocks." in n}
    assert scaling["1.att.value"] == pytest.approx(3 / 4) and scaling["1.att.key"] == pytest.approx(8 / 4)
    assert scaling["0.att.key"] == pytest.approx(8 / 8)
    assert model.get_base_model()._rwkv_lora["rank_pattern"]["blocks.0.att.key"] == 8
    with pytest.raises(ValueError, match=r"rank_pattern key 'att\.gate' matches none of the targeted modules"):
        apply_lora(load_base_model(base_pth, dtype="float32"), rank_pattern={"att.gate": 8})
    with pytest.raises(ValueError, match=r"alpha_pattern key 'head' matches none"):
        apply_lora(load_base_model(base_pth, dtype="float32"), targets="attention", alpha_pattern={"head": 8})
