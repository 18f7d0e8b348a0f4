"""Third-party notices a user cannot act on, silenced one message at a time.

Each helper names the exact message it targets, where it comes from and why it is harmless. Nothing here
touches a whole logger, a whole warning category or the environment; any other message still shows.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

BNB_KERNELS_HUB = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
BNB_INT8_CAST = ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from ")
DEEPSPEED_CPU = ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator")
PEFT_IS_GC_MESSAGE = r"`is_gradient_checkpointing` is deprecated"
TORCH_SCRIPT_METHOD_MESSAGE = r"`torch\.jit\.script_method` is deprecated"


class _DropMessage(logging.Filter):
    """A logger filter that drops the records whose message starts with ``prefix`` and passes all others."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop_log_message(logger_name: str, prefix: str) -> None:
    """Drop the records of one logger whose message starts with ``prefix`` (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def silence_bitsandbytes_notices() -> None:
    """Drop two WARNING records of bitsandbytes (0.50) that it logs on normal CPU runs.

    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure
    you already `pip install kernels` ..." (logger ``bitsandbytes.backends.cpu.ops``): logged when bitsandbytes
    is imported on a CPU with AVX-512 BF16 and cannot fetch an optional fused 4-bit inference kernel from the
    Hugging Face Hub through the ``kernels`` package. peft imports bitsandbytes whenever it is installed, so
    every run printed it, 4-bit or not; bitsandbytes falls back to its own CPU code, and the advice (install a
    package that downloads code at run time) is not one rwkv-peft wants taken.

    "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization" (logger
    ``bitsandbytes.autograd._functions``): logged on every forward of every int8 layer whose input is not fp16,
    hundreds of lines a run. LLM.int8 always quantizes its inputs from fp16; the cast is how it works, and an
    fp16 model (the only way to avoid it) is not what RWKV should be trained in.
    """
    for logger_name, prefix in (BNB_KERNELS_HUB, BNB_INT8_CAST):
        drop_log_message(logger_name, prefix)


def silence_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's (0.19) "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
    to detect it." (logger ``DeepSpeed``, WARNING), logged when ``deepspeed`` is first imported where no GPU is.

    Where DeepSpeed is installed, accelerate's ``unwrap_model`` imports it on every run (to recognise a
    DeepSpeed engine), so every CPU run printed it at the end, DeepSpeed used or not; the CPU is the right
    accelerator there, and nothing is left for the user to do.
    """
    drop_log_message(*DEEPSPEED_CPU)


def preimport_torch_mkldnn() -> None:
    """Import ``torch.utils.mkldnn`` once with its "DeprecationWarning: `torch.jit.script_method` is deprecated.
    Please switch to `torch.compile` or `torch.export`." ignored.

    torch (2.13) issues it while defining the classes of its own ``torch.utils.mkldnn``, which any first
    ``torch.compile`` imports (bitsandbytes compiles a few ops when peft imports it). It is torch's code, not a
    user's, and it is issued only on that first import: importing the module here under the filter uses it up,
    while ``script_method`` in a user's own code still warns.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCH_SCRIPT_METHOD_MESSAGE, category=DeprecationWarning)
        try:
            import torch.utils.mkldnn  # noqa: F401
        except ImportError:  # a torch without it has nothing to warn about
            pass


@contextmanager
def peft_wrapping():
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: ignore transformers' "FutureWarning:
    `is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`
    instead."

    peft (0.21) builds every ``PeftModel`` with ``getattr(model, "is_gradient_checkpointing", True)``, a property
    transformers 5.23 deprecated; no public peft entry point that returns a ``PeftModel`` avoids that line, and
    rwkv-peft never reads the old name itself. Other warnings inside the block still show.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_IS_GC_MESSAGE, category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        yield


def install() -> None:
    """The process-wide part, run once when ``rwkv_peft`` is imported (before peft or bitsandbytes are)."""
    silence_bitsandbytes_notices()
    silence_deepspeed_cpu_notice()
    preimport_torch_mkldnn()
