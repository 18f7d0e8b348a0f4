"""Configuration of RWKV-6 "Finch" models."""
from __future__ import annotations

from transformers import PretrainedConfig


class RWKV6Config(PretrainedConfig):
    """Sizes of an RWKV-6 model. Only ``vocab_size``, ``hidden_size`` and ``num_hidden_layers`` are needed;
    the others default to the values of the official v6 training code for that width:
    ``intermediate_size = int(3.5 * C) // 32 * 32``, ``mix_low_rank = 32`` (``time_maa_w1`` is ``[C, 5 * 32]``),
    ``decay_low_rank = 64`` (``time_decay_w1`` is ``[C, 64]``), both doubled at width 4096 and above.

    ``use_initial_state`` gives every layer a learned initial WKV state (``att.time_state``, ``[H, N, N]`` in
    the layout of state files) that starts every sequence unless a state is passed in; state tuning trains it.
    ``use_initial_shift`` gives both mixes of every layer a learned initial token-shift state (``att.shift_state``,
    ``ffn.shift_state``, ``[C]``): full-state tuning trains them with the WKV state.
    """

    model_type = "rwkv6_peft"
    keys_to_ignore_at_inference = ["state"]

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        head_size: int = 64,
        intermediate_size: int | None = None,
        mix_low_rank: int | None = None,
        decay_low_rank: int | None = None,
        layer_norm_eps: float = 1e-5,
        use_initial_state: bool = False,
        use_initial_shift: bool = False,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if hidden_size % head_size:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of head_size={head_size}")
        wide = 2 if hidden_size >= 4096 else 1
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_size = head_size
        self.intermediate_size = intermediate_size or int(hidden_size * 3.5) // 32 * 32
        self.mix_low_rank = mix_low_rank or 32 * wide
        self.decay_low_rank = decay_low_rank or 64 * wide
        self.layer_norm_eps = layer_norm_eps
        self.use_initial_state = use_initial_state
        self.use_initial_shift = use_initial_shift
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def head_norm_eps(self) -> float:
        """eps of the per-head group norm ``ln_x``: head_size * 1e-5 (64e-5), as in the official code."""
        return self.head_size * 1e-5

    @property
    def num_parameters_estimate(self) -> int:
        C, L, V, F = self.hidden_size, self.num_hidden_layers, self.vocab_size, self.intermediate_size
        low = 2 * C * 5 * self.mix_low_rank + 2 * C * self.decay_low_rank
        return 2 * V * C + L * (5 * C * C + 2 * C * F + C * C + low)

    def describe(self) -> str:
        n = self.num_parameters_estimate
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        return (f"RWKV-6 {size}: {self.num_hidden_layers} layers, width {self.hidden_size}, "
                f"{self.num_heads} heads x {self.head_size}, vocab {self.vocab_size}")
