"""A quiet start: a normal CPU run prints no warning a user cannot act on (see rwkv_peft/quiet.py)."""
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rwkv_peft import quiet

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
NOISE = re.compile(r"warn|failed to load|deprecat", re.IGNORECASE)


@pytest.mark.parametrize("extra", [[], ["--set", "model.quantization=nf4"]], ids=["as-shipped", "nf4"])
def test_quickstart_prints_no_warning(tmp_path, extra):
    """A short quickstart in a fresh process with every warning shown (``-W default``, so DeprecationWarning and
    once-per-place warnings are not hidden by Python's default filters); checkpointing on to cover that path."""
    pytest.importorskip("rwkv_peft.methods")
    if extra:
        pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-W", "default", "-m", "rwkv_peft.cli", "train", str(RECIPE), "--progress", "off",
           "--set", f"output.dir={tmp_path}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
           "--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.eval_every=2",
           "--set", "eval.max_new_tokens=4", "--set", "train.gradient_checkpointing=true", *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = (run.stdout + run.stderr).replace(str(tmp_path), "<tmp>")  # the test's own name holds "warning"
    assert run.returncode == 0, output
    assert "step 2/2" in output  # the run did print its usual lines: the check below has something to read
    noisy = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)


def _tiny(version: int):
    from rwkv_peft import RWKV6Config, RWKV6ForCausalLM, RWKV7Config, RWKV7ForCausalLM

    config_cls, model_cls = (RWKV6Config, RWKV6ForCausalLM) if version == 6 else (RWKV7Config, RWKV7ForCausalLM)
    return model_cls(config_cls(vocab_size=32, hidden_size=64, num_hidden_layers=2, head_size=32,
                                intermediate_size=128))


@pytest.mark.parametrize("version", [6, 7])
def test_enabling_checkpointing_on_our_models_emits_no_future_warning(version):
    from rwkv_peft.training.loop import enable_checkpointing

    model = _tiny(version)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_checkpointing(model)
        assert all(block.gradient_checkpointing for block in model.model.blocks)
        if hasattr(model, "is_activation_checkpointing"):
            assert model.is_activation_checkpointing
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.23+: the check above can fail
        with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()


@pytest.mark.parametrize("version", [6, 7])
def test_lora_on_a_checkpointed_model_trains_without_future_warning(version):
    pytest.importorskip("rwkv_peft.methods")
    import torch

    from rwkv_peft.methods import apply_lora
    from rwkv_peft.training.loop import enable_checkpointing

    model = _tiny(version)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        peft_model = apply_lora(model, r=2, alpha=4)
        enable_checkpointing(peft_model.get_base_model())
        peft_model.train()
        ids = torch.randint(0, 32, (1, 6))
        peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(block.gradient_checkpointing for block in model.model.blocks)
    assert any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("logger_name, message", [
    (quiet.BNB_KERNELS_HUB[0], "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                               "you already `pip install kernels` and the kernels >= 0.11.1"),
    (quiet.BNB_INT8_CAST[0], "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"),
    (quiet.DEEPSPEED_CPU[0], "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                             "detect it. %s"),
])
def test_the_log_filters_drop_only_their_message(logger_name, message):
    quiet.install()
    quiet.install()  # idempotent
    logger = logging.getLogger(logger_name)
    assert sum(isinstance(f, quiet._DropMessage) for f in logger.filters) == 1

    def passes(msg, *args):
        return bool(logger.filter(logging.LogRecord(logger_name, logging.WARNING, __file__, 1, msg, args, None)))

    assert not passes(message, "torch.float32")
    assert passes("Some other warning about %s", "torch.float32")


def test_peft_wrapping_hides_only_the_is_gradient_checkpointing_notice():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet.peft_wrapping():
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                                   FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
            warnings.warn("some other future change", FutureWarning)
    assert [str(w.message) for w in seen] == ["some other future change"]
