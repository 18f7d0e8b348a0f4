from .rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model

__all__ = ["RWKV7Config", "RWKV7Model", "RWKV7ForCausalLM"]
