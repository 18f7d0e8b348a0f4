from .configuration_rwkv6 import RWKV6Config
from .modeling_rwkv6 import RWKV6ForCausalLM, RWKV6Model, RWKV6PreTrainedModel

__all__ = ["RWKV6Config", "RWKV6Model", "RWKV6ForCausalLM", "RWKV6PreTrainedModel"]
