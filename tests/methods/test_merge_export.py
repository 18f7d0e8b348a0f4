"""Merging (one adapter, several with weights, states), exports (.pth in the official package, HF folders,
runtime state files), mismatch errors, and the ``merge`` / ``export`` commands."""
import json

import pytest
import torch

from rwkv_peft.cli import main
from rwkv_peft.convert import convert
from rwkv_peft.merge import MergeError, merge_adapters, save_merged
from rwkv_peft.methods import (
    AdapterMismatchError, apply_lora, apply_state_tuning, export_state_pth, get_states, load_adapter,
    load_base_model, save_adapter,
)
from rwkv_peft.tuners.state_tuning import StateMismatchError
from tests.factories import make_blinkdl_v7, official_reference, rel_err
from tests.methods.conftest import VOCAB, logits, train


@pytest.fixture(scope="module")
def adapters(base_pth, batch, tmp_path_factory):
    """Two trained LoRA + state adapters (different seeds) and one state-only adapter."""
    d = tmp_path_factory.mktemp("adapters")
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = apply_state_tuning(apply_lora(load_base_model(base_pth, dtype="float32"), r=4, alpha=8))
        train(model, batch[:, seed:], steps=4, lr=0.02)
        save_adapter(model, d / f"a{seed}")
        out.append(d / f"a{seed}")
    model = apply_state_tuning(load_base_model(base_pth, dtype="float32"))
    train(model, batch, steps=4, lr=0.05)
    save_adapter(model, d / "state_only")
    out.append(d / "state_only")
    return out


def test_merged_pth_matches_official_package(base_pth, adapters, probe, tmp_path):
    adapter_model = load_adapter(load_base_model(base_pth, dtype="float32"), adapters[0])
    want = logits(adapter_model, probe)
    merged = merge_adapters(base_pth, [adapters[0]])
    assert merged.config.use_initial_state
    assert rel_err(logits(merged, probe), want) <= 1e-5
    save_merged(merged, tmp_path / "merged.pth")
    sd = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert sd["blocks.1.att.time_state"].shape == (2, 64, 64)
    ref = official_reference(tmp_path / "merged.pth", {"full": [probe[0].tolist()], "state_init": True},
                             tmp_path / "ref.pt")
    assert rel_err(want[0], ref["full"][0]) <= 1e-5
    # the HF folder export reloads to the same logits, with the state
    save_merged(merged, tmp_path / "merged_hf")
    assert json.loads((tmp_path / "merged_hf" / "config.json").read_text())["use_initial_state"] is True
    hf = load_base_model(tmp_path / "merged_hf", dtype="float32")
    assert rel_err(logits(hf, probe), want) <= 1e-5
    # and the .pth converts to the same HF folder contents
    convert(tmp_path / "merged.pth", tmp_path / "from_pth")
    assert torch.equal(logits(load_base_model(tmp_path / "from_pth", dtype="float32"), probe), logits(hf, probe))


def test_state_merge_via_runtime_file(base_pth, adapters, probe, tmp_path):
    export_state_pth(adapters[2], tmp_path / "state.pth")
    with_file = merge_adapters(base_pth, [tmp_path / "state.pth"])
    with_dir = merge_adapters(base_pth, [adapters[2]])
    assert torch.equal(logits(with_file, probe), logits(with_dir, probe))


def test_weighted_cat_is_the_weighted_sum_of_deltas(base_pth, adapters, probe):
    base = load_base_model(base_pth, dtype="float32")
    w = (0.7, 0.3)
    singles = [merge_adapters(base_pth, [a]) for a in adapters[:2]]
    combined = merge_adapters(base_pth, adapters[:2], weights=w, combine="cat")
    b_sd, c_sd = base.state_dict(), combined.state_dict()
    s_sd = [m.state_dict() for m in singles]
    for k in b_sd:
        want = b_sd[k] + sum(wi * (s[k] - b_sd[k]) for wi, s in zip(w, s_sd))
        assert rel_err(c_sd[k], want) <= 1e-5, k
    # the states: the same weighted sum
    for c, a, b in zip(get_states(combined), get_states(singles[0]), get_states(singles[1])):
        assert rel_err(c, 0.7 * a + 0.3 * b) <= 1e-6


@pytest.mark.parametrize("combine", ["linear", "ties", "dare_ties", "dare_linear", "svd"])
def test_other_combinations_run(combine, base_pth, adapters, probe):
    merged = merge_adapters(base_pth, adapters[:2], weights=[0.5, 0.5], combine=combine, density=0.6)
    out = logits(merged, probe)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, logits(load_base_model(base_pth, dtype="float32"), probe))


def test_lora_adapter_plus_state_adapter(base_pth, adapters, probe):
    merged = merge_adapters(base_pth, [adapters[0], adapters[2]], weights=[1.0, 1.0], combine="cat")
    states = get_states(merge_adapters(base_pth, [adapters[0]]))
    states2 = get_states(merge_adapters(base_pth, [adapters[2]]))
    for m, a, b in zip(get_states(merged), states, states2):
        assert rel_err(m, a + b) <= 1e-6


def test_mismatched_merges_name_the_dimension(adapters, tmp_path):
    torch.save(make_blinkdl_v7(VOCAB, 128, 3, seed=2), tmp_path / "deeper.pth")
    with pytest.raises(AdapterMismatchError, match="num_hidden_layers differs: the adapter was trained on 2, "
                                                   "the base has 3"):
        merge_adapters(tmp_path / "deeper.pth", [adapters[0]])
    torch.save(make_blinkdl_v7(VOCAB, 192, 2, seed=2), tmp_path / "wider.pth")
    with pytest.raises(AdapterMismatchError, match="hidden_size differs: the adapter was trained on 128, "
                                                   "the base has 192"):
        merge_adapters(tmp_path / "wider.pth", [adapters[0]])
    torch.save(make_blinkdl_v7(VOCAB, 128, 2, head_size=32, seed=2), tmp_path / "heads.pth")
    with pytest.raises(AdapterMismatchError, match="num_heads differs: the adapter was trained on 2, the base has 4"):
        merge_adapters(tmp_path / "heads.pth", [adapters[0]])
    with pytest.raises(StateMismatchError, match="heads differ"):  # a bare state file has no manifest
        export_state_pth(adapters[2], tmp_path / "s.pth")
        merge_adapters(tmp_path / "heads.pth", [tmp_path / "s.pth"])
    # a plain peft folder without our manifest: the LoRA shapes are checked
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / f).write_bytes((adapters[0] / f).read_bytes())
    with pytest.raises(AdapterMismatchError, match="in_features differs: the adapter has 128, the base has 192"):
        merge_adapters(tmp_path / "wider.pth", [plain])
    # load_adapter runs the same checks; a manifest from another architecture or a newer format is refused
    with pytest.raises(AdapterMismatchError, match="num_hidden_layers differs"):
        load_adapter(load_base_model(tmp_path / "deeper.pth", dtype="float32"), adapters[0])
    other = tmp_path / "other"
    other.mkdir()
    for f in adapters[0].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((other / "rwkv_peft_adapter.json").read_text())
    manifest["base"]["architecture"] = "rwkv6"
    (other / "rwkv_peft_adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterMismatchError, match="architecture differs: the adapter was trained on rwkv6, "
                                                   "the base has rwkv7"):
        load_adapter(load_base_model(tmp_path / "wider.pth", dtype="float32"), other)
    manifest["base"]["architecture"], manifest["format_version"] = "rwkv7", 99
    (other / "rwkv_peft_adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterMismatchError, match="format_version differs"):
        merge_adapters(tmp_path / "wider.pth", [other])
    with pytest.raises(MergeError, match="2 adapters but 1 weights"):
        merge_adapters(tmp_path / "wider.pth", adapters[:2], weights=[1.0])


def test_rwkv6_base_is_refused(adapters, tmp_path):
    sd = {"emb.weight": torch.zeros(4, 8), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 8)}
    torch.save(sd, tmp_path / "v6.pth")
    with pytest.raises(ValueError, match="RWKV-6"):
        merge_adapters(tmp_path / "v6.pth", [adapters[0]])


def test_cli_merge_and_export(base_pth, adapters, probe, tmp_path, capsys):
    assert main(["merge", "--base", str(base_pth), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                 "--weights", "0.7,0.3", "--combine", "cat", "--out", str(tmp_path / "m.pth")]) == 0
    direct = merge_adapters(base_pth, adapters[:2], weights=[0.7, 0.3], combine="cat")
    assert rel_err(logits(load_base_model(tmp_path / "m.pth", dtype="float32"), probe), logits(direct, probe)) <= 1e-6
    # export: state adapter -> runtime .pth -> state adapter .safetensors; and a merged model
    assert main(["export", str(adapters[2]), str(tmp_path / "s.pth")]) == 0
    assert main(["export", str(tmp_path / "s.pth"), str(tmp_path / "s.safetensors")]) == 0
    assert main(["export", str(adapters[0]), str(tmp_path / "e_hf"), "--what", "model",
                 "--base", str(base_pth)]) == 0
    want = logits(load_adapter(load_base_model(base_pth, dtype="float32"), adapters[0]), probe)
    assert rel_err(logits(load_base_model(tmp_path / "e_hf", dtype="float32"), probe), want) <= 1e-5
    model = apply_state_tuning(load_base_model(base_pth, dtype="float32"), init=tmp_path / "s.safetensors")
    assert torch.equal(logits(model, probe), logits(load_adapter(load_base_model(base_pth, dtype="float32"),
                                                                   adapters[2]), probe))
    capsys.readouterr()
    # bad input -> exit code 2 with a message naming the problem
    torch.save(make_blinkdl_v7(VOCAB, 128, 3, seed=2), tmp_path / "deeper.pth")
    assert main(["merge", "--base", str(tmp_path / "deeper.pth"), "--adapter", str(adapters[0]),
                 "--out", str(tmp_path / "x.pth")]) == 2
    assert "num_hidden_layers differs" in capsys.readouterr().err
    assert main(["merge", "--base", str(base_pth), "--adapter", str(adapters[0]), "--weights", "a,b",
                 "--out", str(tmp_path / "x.pth")]) == 2
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "y.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("cmd", ["merge", "export"])
def test_cli_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: rwkv-peft " + cmd in capsys.readouterr().out
