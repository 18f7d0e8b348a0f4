"""Configuration of RWKV-4 models."""
from __future__ import annotations

from transformers import PretrainedConfig


class RWKV4Config(PretrainedConfig):
    """Sizes of an RWKV-4 model. Only ``vocab_size``, ``hidden_size`` and ``num_hidden_layers`` are needed;
    ``attention_hidden_size`` (the official ``dim_att``: the width of the WKV channels) defaults to
    ``hidden_size`` and ``intermediate_size`` to the official v4 training code's ``4 * hidden_size``.

    RWKV-4 has no heads: each of the ``attention_hidden_size`` channels runs its own scalar recurrence, with a
    per-channel decay ``exp(-exp(time_decay))`` and bonus ``time_first``. Its WKV state is three vectors
    (numerator, denominator, shared exponent), so there is no matrix state to learn: RWKV-4 has no learned
    initial state (``use_initial_state`` does not exist here) and state tuning is not offered for it.
    """

    model_type = "rwkv4_peft"
    keys_to_ignore_at_inference = ["state"]

    def __init__(
        self,
        vocab_size: int = 50277,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        attention_hidden_size: int | None = None,
        intermediate_size: int | None = None,
        layer_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.attention_hidden_size = attention_hidden_size or hidden_size
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_parameters_estimate(self) -> int:
        C, A, L, V, F = (self.hidden_size, self.attention_hidden_size, self.num_hidden_layers, self.vocab_size,
                         self.intermediate_size)
        return 2 * V * C + L * (4 * C * A + 2 * C * F + C * C)

    def describe(self) -> str:
        n = self.num_parameters_estimate
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        att = "" if self.attention_hidden_size == self.hidden_size else f", {self.attention_hidden_size} WKV channels"
        return f"RWKV-4 {size}: {self.num_hidden_layers} layers, width {self.hidden_size}{att}, vocab {self.vocab_size}"
