"""Where ``build_model`` puts the base under several processes: each rank passes its own device, so a quantized
base loads onto that rank's GPU (``device_map={"": index}``) and a plain ``.pth`` base is moved there; checked as
far as a CPU allows (what is asked of the loaders, then a real nf4 load on the CPU)."""
import pytest
import torch

import rwkv_peft.methods as methods
import rwkv_peft.methods.loading as loading
from rwkv_peft.recipe import recipe_from_text
from rwkv_peft.training.setup import build_model


def _recipe(model_path, quantization=None, lora=True):
    q = f", quantization: {quantization}" if quantization else ""
    return recipe_from_text(f"""
model: {{path: {model_path}, dtype: float32{q}}}
method: {{lora: {{enabled: {str(lora).lower()}, r: 4}}, state_tuning: {{enabled: {str(not lora).lower()}}}}}
data: {{train: unused.jsonl}}
""", "setup.yaml")


@pytest.fixture
def load_calls(monkeypatch):
    """The kwargs build_model hands to methods.load_base_model; the model itself is loaded plainly on the CPU."""
    calls, real = [], methods.load_base_model

    def fake(path, **kwargs):
        calls.append({"path": path, **kwargs})
        return real(path, dtype=kwargs.get("dtype", "float32"))

    monkeypatch.setattr(methods, "load_base_model", fake)
    return calls


@pytest.mark.parametrize("device,want", [
    (torch.device("cuda", 1), {"": 1}),  # rank 1 of a two-GPU run: its own GPU, not GPU 0
    (torch.device("cuda", 0), {"": 0}),
    (torch.device("cuda"), {"": 0}),  # no index: the current device 0
    (torch.device("cpu"), "cpu"),
    (None, None),  # no device: load_base_model's default placement
])
@pytest.mark.parametrize("quantization", ["nf4", None])
def test_build_model_asks_for_the_rank_device(device, want, quantization, load_calls, tiny_model):
    model = build_model(_recipe(tiny_model, quantization), device, log=lambda m: None)
    assert len(load_calls) == 1
    call = load_calls[0]
    assert call["device_map"] == want and type(call["device_map"]) is type(want)
    assert call["quantization"] == quantization and call["dtype"] == "float32" and call["double_quant"] is False
    assert call["path"] == str(tiny_model)
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the method was attached to what came back


def test_quantized_load_goes_to_the_rank_gpu(monkeypatch, tiny_model):
    """The whole chain for nf4 on rank 1: build_model -> load_base_model -> from_pretrained(device_map={"": 1});
    the load itself then runs on the CPU (no GPU here) and must give a 4-bit model that records {"": 1}."""
    from transformers import AutoModelForCausalLM
    pytest.importorskip("bitsandbytes")
    seen, real = [], AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(dict(kwargs))
        kwargs["device_map"] = "cpu"
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model = build_model(_recipe(tiny_model, "nf4"), torch.device("cuda", 1), log=lambda m: None)
    assert len(seen) == 1 and seen[0]["device_map"] == {"": 1}
    assert seen[0]["quantization_config"].load_in_4bit and seen[0]["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert methods.is_quantized(model)
    assert methods.load_info(model)["device_map"] == {"": 1}  # what a PiSSA re-quantization reloads onto


def test_plain_pth_base_moves_to_the_rank_gpu(monkeypatch, tiny_model):
    """An unquantized .pth on rank 1 is built and then moved to "cuda:1" (the move itself needs a GPU)."""
    devices, real = [], loading._build_from_state_dict

    def spy(config, sd, dtype, device=None):
        devices.append(device)
        return real(config, sd, dtype, None)

    monkeypatch.setattr(loading, "_build_from_state_dict", spy)
    build_model(_recipe(tiny_model, lora=False), torch.device("cuda", 1), log=lambda m: None)
    build_model(_recipe(tiny_model, lora=False), torch.device("cpu"), log=lambda m: None)
    build_model(_recipe(tiny_model, lora=False), None, log=lambda m: None)
    assert devices == ["cuda:1", "cpu", None]


def test_real_nf4_load_on_cpu(tiny_model):
    """No fakes: an nf4 recipe built for the CPU device is a 4-bit model on the CPU with LoRA that runs."""
    pytest.importorskip("bitsandbytes")
    model = build_model(_recipe(tiny_model, "nf4"), torch.device("cpu"), log=lambda m: None)
    assert methods.is_quantized(model)
    assert methods.load_info(model)["device_map"] == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    ids = torch.randint(0, 64, (1, 8))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad)
