"""Configuration of RWKV-7 "Goose" models."""
from __future__ import annotations


from transformers import PretrainedConfig


def default_low_rank(hidden_size: int, factor: float, power: float) -> int:
    """The low-rank sizes the official RWKV-7 training code uses for a given width (multiples of 32)."""
    return max(32, int(round(factor * hidden_size ** power / 32) * 32))


class RWKV7Config(PretrainedConfig):
    """Sizes of an RWKV-7 model. Only ``vocab_size``, ``hidden_size`` and ``num_hidden_layers`` are needed;
    the others default to the values of the official training code for that width.

    ``use_initial_state`` gives every layer a learned initial WKV state ``[H, N, N]`` (``att.time_state``)
    that starts every sequence unless a state is passed in; state tuning trains it.
    ``use_initial_shift`` gives both mixes of every layer a learned initial token-shift state (``att.shift_state``,
    ``ffn.shift_state``, ``[C]``): full-state tuning trains them with the WKV state.

    ``deep_embed_rank`` (R, 0 = off; 32 in the released models) makes it a DeepEmbed model: every channel mix has
    a per-token table ``s_emb`` ``[V, R*R]`` (plus ``s_emb_x`` ``[R*R, C]`` applied to the normalized token
    embedding) and scales its squared-ReLU key by ``((x @ s1) @ S_token) @ s2 + s0``, ``S_token`` being the
    token's row seen as ``R x R``. ``deep_embed_on_cpu`` keeps those tables in CPU memory when the model moves
    to a GPU (each forward sends only its tokens' rows), so a large DeepEmbed model fits a consumer GPU.
    """

    model_type = "rwkv7_peft"
    keys_to_ignore_at_inference = ["state"]

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        head_size: int = 64,
        intermediate_size: int | None = None,
        decay_low_rank: int | None = None,
        a_low_rank: int | None = None,
        v_low_rank: int | None = None,
        gate_low_rank: int | None = None,
        layer_norm_eps: float = 1e-5,
        use_initial_state: bool = False,
        use_initial_shift: bool = False,
        deep_embed_rank: int = 0,
        deep_embed_on_cpu: bool = True,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if hidden_size % head_size:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of head_size={head_size}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_size = head_size
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.decay_low_rank = decay_low_rank or default_low_rank(hidden_size, 1.8, 0.5)
        self.a_low_rank = a_low_rank or default_low_rank(hidden_size, 1.8, 0.5)
        self.v_low_rank = v_low_rank or default_low_rank(hidden_size, 1.3, 0.5)
        self.gate_low_rank = gate_low_rank or default_low_rank(hidden_size, 0.6, 0.8)
        self.layer_norm_eps = layer_norm_eps
        self.use_initial_state = use_initial_state
        self.use_initial_shift = use_initial_shift
        self.deep_embed_rank = deep_embed_rank
        self.deep_embed_on_cpu = deep_embed_on_cpu
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def head_norm_eps(self) -> float:
        """eps of the per-head group norm ``ln_x``: head_size * 1e-5, as in the official code."""
        return self.head_size * 1e-5

    @property
    def num_parameters_estimate(self) -> int:
        C, L, V, F = self.hidden_size, self.num_hidden_layers, self.vocab_size, self.intermediate_size
        low = 2 * C * (self.decay_low_rank + self.a_low_rank + self.v_low_rank + self.gate_low_rank)
        R2 = self.deep_embed_rank ** 2
        deep = (V * R2 + R2 * C + self.deep_embed_rank * (C + F) + F) if R2 else 0
        return 2 * V * C + L * (4 * C * C + 2 * C * F + low + deep)

    def describe(self) -> str:
        n = self.num_parameters_estimate
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        kind = "RWKV-7 DeepEmbed" if self.deep_embed_rank else "RWKV-7"
        return (f"{kind} {size}: {self.num_hidden_layers} layers, width {self.hidden_size}, "
                f"{self.num_heads} heads x {self.head_size}, vocab {self.vocab_size}")


