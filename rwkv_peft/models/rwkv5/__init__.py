from .configuration_rwkv5 import RWKV5Config
from .modeling_rwkv5 import RWKV5ForCausalLM, RWKV5Model, RWKV5PreTrainedModel

__all__ = ["RWKV5Config", "RWKV5Model", "RWKV5ForCausalLM", "RWKV5PreTrainedModel"]
