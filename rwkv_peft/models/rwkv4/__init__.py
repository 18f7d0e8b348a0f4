from .configuration_rwkv4 import RWKV4Config
from .modeling_rwkv4 import RWKV4ForCausalLM, RWKV4Model, RWKV4PreTrainedModel

__all__ = ["RWKV4Config", "RWKV4Model", "RWKV4ForCausalLM", "RWKV4PreTrainedModel"]
