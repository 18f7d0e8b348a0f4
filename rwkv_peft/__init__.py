"""rwkv-peft: fine-tuning for RWKV language models (LoRA, state tuning, quantized bases, recipes).

Importing the package registers the RWKV-7 classes with transformers' Auto classes.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from .tokenization import RWKVWorldTokenizer

__version__ = "0.1.0"

AutoConfig.register(RWKV7Config.model_type, RWKV7Config, exist_ok=True)
AutoModel.register(RWKV7Config, RWKV7Model, exist_ok=True)
AutoModelForCausalLM.register(RWKV7Config, RWKV7ForCausalLM, exist_ok=True)
AutoTokenizer.register(RWKV7Config, slow_tokenizer_class=RWKVWorldTokenizer, exist_ok=True)

__all__ = ["RWKV7Config", "RWKV7Model", "RWKV7ForCausalLM", "RWKVWorldTokenizer", "__version__"]
