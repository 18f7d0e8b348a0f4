"""rwkv-peft: fine-tuning for RWKV language models (LoRA, state tuning, quantized bases, recipes).

Importing the package registers every version's classes (``rwkv_peft.versions``) with transformers' Auto classes and silences the few
third-party notices listed in ``rwkv_peft.quiet`` (each one message, none a user can act on).
"""
from . import quiet

quiet.install()  # before anything imports peft (which imports bitsandbytes)

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .models.rwkv4 import RWKV4Config, RWKV4ForCausalLM, RWKV4Model
from .models.rwkv5 import RWKV5Config, RWKV5ForCausalLM, RWKV5Model
from .models.rwkv6 import RWKV6Config, RWKV6ForCausalLM, RWKV6Model
from .models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from .tokenization import RWKVWorldTokenizer

__version__ = "0.1.0"

from .versions import VERSIONS  # noqa: E402

for _v in VERSIONS:  # every version in rwkv_peft.versions, with the World tokenizer
    AutoConfig.register(_v.model_type, _v.config_class, exist_ok=True)
    AutoModel.register(_v.config_class, _v.model_class, exist_ok=True)
    AutoModelForCausalLM.register(_v.config_class, _v.causal_lm_class, exist_ok=True)
    AutoTokenizer.register(_v.config_class, slow_tokenizer_class=RWKVWorldTokenizer, exist_ok=True)

__all__ = ["RWKV7Config", "RWKV7Model", "RWKV7ForCausalLM", "RWKV6Config", "RWKV6Model", "RWKV6ForCausalLM",
           "RWKV5Config", "RWKV5Model", "RWKV5ForCausalLM",
           "RWKV4Config", "RWKV4Model", "RWKV4ForCausalLM",
           "RWKVWorldTokenizer", "__version__"]
