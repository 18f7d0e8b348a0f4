"""rwkv-peft: fine-tuning for RWKV language models (LoRA, state tuning, quantized bases, recipes).

Importing the package registers the RWKV-7 classes with transformers' Auto classes and silences the few
third-party notices listed in ``rwkv_peft.quiet`` (each one message, none a user can act on).
"""
from . import quiet

quiet.install()  # before anything imports peft (which imports bitsandbytes)

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .models.rwkv5 import RWKV5Config, RWKV5ForCausalLM, RWKV5Model
from .models.rwkv6 import RWKV6Config, RWKV6ForCausalLM, RWKV6Model
from .models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from .tokenization import RWKVWorldTokenizer

__version__ = "0.1.0"

AutoConfig.register(RWKV7Config.model_type, RWKV7Config, exist_ok=True)
AutoModel.register(RWKV7Config, RWKV7Model, exist_ok=True)
AutoModelForCausalLM.register(RWKV7Config, RWKV7ForCausalLM, exist_ok=True)
AutoTokenizer.register(RWKV7Config, slow_tokenizer_class=RWKVWorldTokenizer, exist_ok=True)
AutoConfig.register(RWKV6Config.model_type, RWKV6Config, exist_ok=True)
AutoModel.register(RWKV6Config, RWKV6Model, exist_ok=True)
AutoModelForCausalLM.register(RWKV6Config, RWKV6ForCausalLM, exist_ok=True)
AutoTokenizer.register(RWKV6Config, slow_tokenizer_class=RWKVWorldTokenizer, exist_ok=True)
AutoConfig.register(RWKV5Config.model_type, RWKV5Config, exist_ok=True)
AutoModel.register(RWKV5Config, RWKV5Model, exist_ok=True)
AutoModelForCausalLM.register(RWKV5Config, RWKV5ForCausalLM, exist_ok=True)
AutoTokenizer.register(RWKV5Config, slow_tokenizer_class=RWKVWorldTokenizer, exist_ok=True)

__all__ = ["RWKV7Config", "RWKV7Model", "RWKV7ForCausalLM", "RWKV6Config", "RWKV6Model", "RWKV6ForCausalLM",
           "RWKV5Config", "RWKV5Model", "RWKV5ForCausalLM",
           "RWKVWorldTokenizer", "__version__"]
