"""Weights stored for CPU decoding (``methods.prepare_for_cpu_decoding``, ``--cpu-weights``): fp16 and int8
packed layers against float32, every version, peft adapters merged first, state adapters kept, clear refusals."""
import pytest
import torch
from torch import nn

from rwkv_peft import methods, versions
from rwkv_peft.cli import main
from rwkv_peft.methods import CPUDecodingError, PackedLinear, packed_summary, prepare_for_cpu_decoding
from tests.factories import rel_err
from tests.models.test_conventions import _load

pytestmark = pytest.mark.skipif(torch.backends.quantized.engine not in ("x86", "fbgemm"),
                                reason="fp16 / int8 CPU weights need PyTorch's fbgemm operators (x86)")

QS = "assets:quickstart/model"
IDS = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(4))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _kl(got, want):
    """Mean KL(want || got) of the next-token distributions."""
    return torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_float32(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    x = torch.randn(2, 5, 96)
    want = lin(x).detach()
    fp16, int8 = PackedLinear(lin, "fp16"), PackedLinear(lin, "int8")
    assert fp16(x).shape == int8(x).shape == (2, 5, 80)
    assert rel_err(fp16(x), want) < 2e-3          # float16 weights: ~11 bits
    assert 1e-4 < rel_err(int8(x), want) < 3e-2   # 8-bit weights and 7-bit activations: a real, bounded error
    assert int8(x.bfloat16()).dtype == torch.bfloat16  # computed in float32, handed back in the input's dtype
    assert not list(fp16.parameters())  # inference only: nothing to train
    with pytest.raises(CPUDecodingError, match="'int4'"):
        PackedLinear(lin, "int4")


@pytest.fixture(scope="module", params=[v.name for v in versions.VERSIONS])
def small(request):
    return _load(request.param, 2, 5)


# int8 on these random 2-layer models: KL 0.02-0.08 and 3-6% relative error (7-bit activations, one scale per call)
@pytest.mark.parametrize("weights,max_kl,max_err", [("fp16", 2e-5, 2e-3), ("int8", 0.15, 0.1)])
def test_every_version_packs_its_big_projections_and_head(small, weights, max_kl, max_err):
    import copy
    want = _logits(small)
    packed = prepare_for_cpu_decoding(copy.deepcopy(small), weights)
    counts = packed_summary(packed)
    layers = small.config.num_hidden_layers
    default = versions.of(small).lora_presets["default"]
    assert counts[weights] == layers * len(default) + 1  # the default LoRA targets of every layer, and the head
    assert counts["fp32"] == packed_summary(small)["fp32"] - counts[weights]  # the low-rank maps stay float32
    got = _logits(packed)
    assert _kl(got, want) < max_kl and 0 < rel_err(got, want) < max_err
    gen = packed.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    assert gen.shape == (2, 13)


def test_fp32_only_relays_the_weights(small):
    import copy
    model = copy.deepcopy(small)
    assert prepare_for_cpu_decoding(model, "fp32") is model
    assert packed_summary(model)["int8"] == packed_summary(model)["fp16"] == 0
    assert rel_err(_logits(model), _logits(small)) < 1e-5


def test_peft_adapter_is_merged_and_state_adapter_kept():
    import copy
    base = _load("rwkv7", 2, 5)
    model = methods.apply_lora(copy.deepcopy(base), r=4, alpha=8, targets="default")
    model = methods.apply_state_tuning(model, init="zeros")
    with torch.no_grad():  # an adapter that changes the output: LoRA B and the learned state non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name or "time_state" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    want = _logits(model)
    assert rel_err(want, _logits(base)) > 1e-2
    packed = prepare_for_cpu_decoding(model, "fp16")
    assert not hasattr(packed, "peft_config")
    assert any("time_state" in n for n, _ in packed.named_parameters())
    assert rel_err(_logits(packed), want) < 5e-3


def test_refusals_name_the_cause(monkeypatch):
    model = _load("rwkv7", 1, 5)
    with pytest.raises(CPUDecodingError, match="float32"):
        prepare_for_cpu_decoding(model.to(torch.bfloat16), "int8")
    with pytest.raises(CPUDecodingError, match="expected one of fp32, fp16, int8"):
        prepare_for_cpu_decoding(model, "int4")
    monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack", raising=False)
    with pytest.raises(CPUDecodingError, match="fbgemm.*'qnnpack'.*--cpu-weights fp32"):
        prepare_for_cpu_decoding(model.float(), "int8")


def test_trained_model_generates_the_same_text(capsys):
    """The quickstart model (trained, shipped with the package): greedy text with fp16 and int8 weights is the
    fp32 text; the CLI refuses int8 with bf16 activations."""
    prompt = "User: Tell me about bread.\n\nAssistant:"
    texts = {}
    for weights in methods.CPU_WEIGHTS:
        assert main(["generate", QS, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24",
                     "--cpu-weights", weights, "--device", "cpu"]) == 0
        texts[weights] = capsys.readouterr().out
    assert len(texts["fp32"].split()) > 10
    assert texts["fp16"] == texts["fp32"] == texts["int8"]
    assert main(["generate", QS, "--prompt", prompt, "--cpu-weights", "int8", "--dtype", "bfloat16",
                 "--device", "cpu"]) == 2
    assert "--dtype float32" in capsys.readouterr().err


def test_a_pytorch_without_the_operators_is_refused_clearly(monkeypatch):
    """The fbgemm operators are PyTorch's (announced to go with its quantized tensors): their absence is a
    clear error naming the way out, not a traceback."""
    def gone(*a, **k):
        raise RuntimeError("No such operator quantized::linear_prepack_fp16\nmore")
    monkeypatch.setattr(torch.ops.quantized, "linear_prepack_fp16", gone)
    with pytest.raises(CPUDecodingError, match=r"cannot pack weights for fbgemm \(RuntimeError: No such operator "
                                               r"quantized::linear_prepack_fp16\); use --cpu-weights fp32"):
        PackedLinear(nn.Linear(8, 8), "fp16")


def test_command_choices_are_the_methods_choices():
    import argparse

    from rwkv_peft.commands._common import add_placement_arguments
    p = argparse.ArgumentParser()
    add_placement_arguments(p)
    action = next(a for a in p._actions if a.dest == "cpu_weights")
    assert tuple(action.choices) == methods.CPU_WEIGHTS and action.default == "fp32"


def test_doctor_says_what_cpu_decoding_can_use(monkeypatch, capsys):
    from rwkv_peft.commands.doctor import cpu_decoding_line
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "WKV-7 path on cpu: torch" in out and cpu_decoding_line() in out
    assert cpu_decoding_line().startswith("CPU decoding (--cpu-weights): fp32, fp16, int8")
    monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack", raising=False)
    assert "fp32 only" in cpu_decoding_line() and "'qnnpack'" in cpu_decoding_line()
