"""State tuning on every version with a matrix state (RWKV-7, RWKV-6, RWKV-5.2), through the version registry:
attach, train the states only, save / load the adapter, refuse another version's base, and the runtime state
file reproduced by the official ``rwkv`` package (fp32, relative error <= 1e-5)."""
import json

import pytest
import torch
from safetensors import safe_open

from rwkv_peft import versions
from rwkv_peft.export import export
from rwkv_peft.merge import merge_adapters, save_merged
from rwkv_peft.methods import apply_state_tuning, load_adapter, load_base_model, save_adapter, trainable_summary
from rwkv_peft.methods.adapter_io import AdapterMismatchError
from rwkv_peft.tuners.state_tuning import STATE_FILE, StateMismatchError
from tests.factories import make_blinkdl_v7, official_reference, rel_err
from tests.factories_v5 import make_blinkdl_v5, official_reference_v5
from tests.factories_v6 import make_blinkdl_v6, official_reference_v6
from tests.methods.conftest import LAYERS, VOCAB, WIDTH, falling, logits, train

FACTORIES = {"rwkv7": make_blinkdl_v7, "rwkv6": make_blinkdl_v6, "rwkv5": make_blinkdl_v5}
OFFICIAL = {"rwkv7": official_reference, "rwkv6": official_reference_v6, "rwkv5": official_reference_v5}
WIRED = [v.name for v in versions.VERSIONS if v.state_tuning]


def test_every_matrix_state_version_is_wired():
    assert set(WIRED) == {"rwkv7", "rwkv6", "rwkv5"}


@pytest.fixture(scope="module", params=WIRED)
def base(request, tmp_path_factory):
    """(version, path of a tiny BlinkDL .pth of it): 2 layers of 2 heads x 64, vocab 97."""
    path = tmp_path_factory.mktemp(request.param) / "base.pth"
    torch.save(FACTORIES[request.param](VOCAB, WIDTH, LAYERS, seed=21), path)
    return versions.by_name(request.param), path


def _random_states(model, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.model.blocks:
            m.att.time_state.copy_(torch.randn(m.att.time_state.shape, generator=g) * scale)


def test_only_the_states_train(base, batch):
    version, path = base
    model = load_base_model(path, dtype="float32")
    assert versions.of(model) is version and model.model.blocks[0].att.time_state is None
    apply_state_tuning(model)
    assert model.config.use_initial_state
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.blocks.{i}.att.time_state" for i in range(LAYERS)]
    assert "[state: 16,384]" in trainable_summary(model)  # 2 layers x 2 x 64 x 64
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, batch, steps=6, lr=0.05)
    assert falling(losses), losses
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert all(m.att.time_state.abs().max() > 0 for m in model.model.blocks)


def test_round_trip_and_the_official_package_from_the_runtime_file(base, probe, tmp_path):
    """Saved as our adapter (version recorded), loaded back exactly, exported with ``rwkv-peft export``'s
    function, and the official package started from that runtime file gives our logits (<= 1e-5)."""
    version, path = base
    model = apply_state_tuning(load_base_model(path, dtype="float32"))
    _random_states(model, scale=1.0, seed=3)
    want = logits(model, probe)
    assert not torch.allclose(want, logits(load_base_model(path, dtype="float32"), probe))  # the state matters

    save_adapter(model, tmp_path / "adapter")
    manifest = json.loads((tmp_path / "adapter" / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"] == {"lora": False, "state": True}
    assert manifest["base"]["architecture"] == manifest["state"]["architecture"] == version.name
    assert manifest["state"]["layout"] == version.state_layout
    with safe_open(str(tmp_path / "adapter" / STATE_FILE), framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == version.name and meta["version"] == version.blinkdl
    assert meta["layout"] == version.state_layout and meta["runtime_layout"] == version.runtime_state_layout
    loaded = load_adapter(load_base_model(path, dtype="float32"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, probe), want)
    again = load_adapter(load_base_model(path, dtype="float32"), tmp_path / "adapter", is_trainable=True)
    assert all(m.att.time_state.requires_grad for m in again.model.blocks)

    msg = export(tmp_path / "adapter", tmp_path / "state.pth")
    assert version.title in msg
    raw = torch.load(tmp_path / "state.pth", weights_only=True)
    assert sorted(raw) == [f"blocks.{i}.att.time_state" for i in range(LAYERS)]
    for i, m in enumerate(model.model.blocks):  # every version's file is S[h, value, key]: our parameter
        assert torch.equal(raw[f"blocks.{i}.att.time_state"], m.att.time_state.detach())
    # the runtime file starts a new state tuning run exactly where this one is
    resumed = apply_state_tuning(load_base_model(path, dtype="float32"), init=tmp_path / "state.pth")
    assert torch.equal(logits(resumed, probe), want)

    toks = probe[0].tolist()
    if version.runtime_reads_checkpoint_state:
        # RWKV-5/6: the package reads time_state from the checkpoint by itself: the adapter merged into the
        # base (``rwkv-peft merge``; the same file as RWKV-PEFT's merge_state.py makes by copying the state
        # file's keys into the model .pth); and, separately, from the runtime file put into the state list
        # transposed, as RWKV-Runner does
        save_merged(merge_adapters(path, [tmp_path / "adapter"]), tmp_path / "with_state.pth")
        merged = torch.load(tmp_path / "with_state.pth", weights_only=True)
        assert all(torch.equal(merged[k], v) for k, v in raw.items())
        ref = OFFICIAL[version.name](tmp_path / "with_state.pth",
                                     {"full": [toks], "state_file": str(tmp_path / "state.pth")}, tmp_path / "ref.pt")
        assert rel_err(want[0], ref["full"][0]) <= 1e-5
        assert rel_err(want[0], ref["full_from_file"][0]) <= 1e-5
    else:  # RWKV-7: the package ignores a checkpoint's time_state; the runtime passes the file's tensors in
        ref = OFFICIAL[version.name](path, {"full": [toks], "state_file": str(tmp_path / "state.pth")},
                                     tmp_path / "ref.pt")
        assert rel_err(want[0], ref["full"][0]) <= 1e-5
    # the final state too: ours carries the WKV state in the layout the package's state list has
    # (Version.runtime_state_layout), so the runtime can go on from either
    with torch.no_grad():
        state = model(input_ids=probe, use_cache=True).state
    for i, (att_x, wkv, ffn_x) in enumerate(state):
        assert rel_err(wkv[0], ref["full_state"][0][3 * i + 1]) <= 1e-5
        assert rel_err(att_x[0], ref["full_state"][0][3 * i]) <= 1e-5


def test_another_versions_state_is_refused(base, tmp_path):
    """A state trained on one version does not fit another's base of the same sizes: refused, naming both
    (each version's base gets the next version's state: v7 <- v6 <- v5 <- v7)."""
    version, path = base
    other = WIRED[(WIRED.index(version.name) + 1) % len(WIRED)]
    other_path = tmp_path / "other.pth"
    torch.save(FACTORIES[other](VOCAB, WIDTH, LAYERS, seed=4), other_path)
    tuned = apply_state_tuning(load_base_model(other_path, dtype="float32"))
    _random_states(tuned)
    save_adapter(tuned, tmp_path / "other_adapter")
    theirs = versions.by_name(other)
    with pytest.raises(AdapterMismatchError, match=f"architecture differs: the adapter was trained on {other}, "
                                                   f"the base has {version.name}"):
        load_adapter(load_base_model(path, dtype="float32"), tmp_path / "other_adapter")
    # the state file alone (no manifest) names the version too
    with pytest.raises(StateMismatchError, match=f"version differs: the state was trained on {theirs.title} "
                                                 f"\\({other}\\), the model is {version.title}"):
        apply_state_tuning(load_base_model(path, dtype="float32"), init=tmp_path / "other_adapter" / STATE_FILE)


def test_lora_and_state_on_a_quantized_base(base, batch, probe, tmp_path):
    """LoRA + state in one run on an NF4 base (bf16 compute, fp32 state), saved and loaded back exactly."""
    from rwkv_peft.methods import apply_lora
    version, path = base
    model = load_base_model(path, dtype="bfloat16", quantization="nf4", trainable_initial_state=True)
    torch.manual_seed(0)  # LoRA's init
    model = apply_state_tuning(apply_lora(model, r=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and sum(n.endswith("time_state") for n in names) == LAYERS
    assert model.get_base_model().model.blocks[0].att.time_state.dtype == torch.float32
    losses = train(model, batch, lr=0.02)
    assert falling(losses), losses
    save_adapter(model, tmp_path / "q")
    loaded = load_adapter(load_base_model(path, dtype="bfloat16", quantization="nf4"), tmp_path / "q")
    assert torch.equal(logits(loaded, probe), logits(model, probe))


def test_full_state_tuning_trains_saves_and_runs_in_the_official_package(base, batch, probe, tmp_path):
    """Full-state tuning: the WKV state and both token-shift states of every layer train; the adapter reloads
    exactly; the runtime .pth carries the shift states; the official package started from the full state list
    (``official_state``) gives our logits (<= 1e-5); a WKV-only runtime file gives zeros for the shifts."""
    from rwkv_peft.tuners.state_tuning import export_state_pth, official_state
    version, path = base
    model = apply_state_tuning(load_base_model(path, dtype="float32"), full=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"model.blocks.{i}.{m}" for i in range(LAYERS)
                                for m in ("att.time_state", "att.shift_state", "ffn.shift_state")])
    losses = train(model, batch, steps=6, lr=0.05)
    assert falling(losses), losses
    assert all(b.att.shift_state.abs().max() > 0 and b.ffn.shift_state.abs().max() > 0 for b in model.model.blocks)
    want = logits(model, probe)

    save_adapter(model, tmp_path / "adapter")
    manifest = json.loads((tmp_path / "adapter" / "rwkv_peft_adapter.json").read_text())
    assert manifest["state"]["full"] is True
    loaded = load_adapter(load_base_model(path, dtype="float32"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, probe), want)
    resumed = load_adapter(load_base_model(path, dtype="float32"), tmp_path / "adapter", is_trainable=True)
    assert sum(p.requires_grad for n, p in resumed.named_parameters() if n.endswith("shift_state")) == 2 * LAYERS

    export_state_pth(tmp_path / "adapter", tmp_path / "wkv.pth")  # RWKV-Runner counts keys as layers: WKV only
    assert sorted(torch.load(tmp_path / "wkv.pth", weights_only=True)) == [f"blocks.{i}.att.time_state"
                                                                          for i in range(LAYERS)]
    again = apply_state_tuning(load_base_model(path, dtype="float32"), init=tmp_path / "adapter", full=True)
    assert torch.equal(logits(again, probe), want)
    torch.save(official_state(tmp_path / "adapter", version.name), tmp_path / "list.pt")
    ref = OFFICIAL[version.name](path, {"full": [probe[0].tolist()], "state_list": str(tmp_path / "list.pt")},
                                 tmp_path / "ref.pt")
    assert rel_err(want[0], ref["full_from_list"][0]) <= 1e-5
    # merged into the base (.pth): the shift states travel under their own keys and load back
    save_merged(merge_adapters(path, [tmp_path / "adapter"]), tmp_path / "merged.pth")
    merged = load_base_model(tmp_path / "merged.pth", dtype="float32")
    assert merged.config.use_initial_shift and rel_err(logits(merged, probe)[0], want[0]) <= 1e-5
