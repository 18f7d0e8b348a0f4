"""The chunked WKV forms (v7, v6) run long sequences block by block: exact across block boundaries (values and float64
gradients of every input, the initial state included), and their cost is linear in T (issue #15): the bytes the
forward and backward allocate grow like T, not like T^2 (slicing a whole-sequence tensor per chunk in the loop gave
every chunk's backward a zero-filled gradient the size of the whole sequence)."""
import importlib

import pytest
import torch
from torch.profiler import profile

from tests.ops.test_wkv6 import inputs as inputs6
from tests.ops.test_wkv7 import inputs as inputs7

# the modules (``rwkv_peft.ops.wkv7`` the attribute is the function of that name)
wkv7_mod = importlib.import_module("rwkv_peft.ops.wkv7")
wkv6_mod = importlib.import_module("rwkv_peft.ops.wkv6")


def rel(x, y):
    return float((x - y).detach().abs().max() / y.detach().abs().max())


def _case(version, B, T, H, N, state, seed=0, **kw):
    g = torch.Generator().manual_seed(seed + 100)
    s0 = {"none": None, "batch": torch.randn(B, H, N, N, generator=g, dtype=torch.float64),
          "shared": torch.randn(H, N, N, generator=g, dtype=torch.float64)}[state]
    if version == "v7":
        return inputs7(B, T, H, N, seed=seed, **kw), s0, wkv7_mod.wkv7_recurrent, wkv7_mod.wkv7_chunked
    return inputs6(B, T, H, N, seed=seed, **kw), s0, wkv6_mod.wkv6_recurrent, wkv6_mod.wkv6_chunked


@pytest.mark.parametrize("version", ["v7", "v6"])
@pytest.mark.parametrize("state", ["batch", "shared"])
@pytest.mark.parametrize("block_tokens,chunk", [(8, 4), (10, 4), (5, 8)])  # 8; 10 -> 8; 5 -> one chunk per block
def test_blocks_match_recurrent_values_and_float64_gradients(monkeypatch, version, state, block_tokens, chunk):
    monkeypatch.setattr(wkv7_mod, "BLOCK_TOKENS", block_tokens)
    B, T, H, N = 2, 29, 2, 4                       # several blocks, the last one padded
    x, s0, reference, chunked = _case(version, B, T, H, N, state, seed=3)
    leaves = [t.clone().requires_grad_() for t in x] + [s0.clone().requires_grad_()]
    g = torch.Generator().manual_seed(5)
    do = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)

    def run(fn, **kw):
        o, S = fn(*leaves[:-1], initial_state=leaves[-1], **kw)
        return [o, S] + list(torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves))

    inputs = "r w k v a b" if version == "v7" else "r w k v u"
    names = ["o", "S"] + [f"d{n}" for n in inputs.split()] + ["ds0"]
    for name, got, want in zip(names, run(chunked, chunk_size=chunk), run(reference)):
        assert torch.isfinite(got).all(), name
        assert rel(got, want) < 1e-10, name


@pytest.mark.parametrize("version", ["v7", "v6"])
def test_blocks_take_the_safe_path_where_a_block_decays_to_nothing(monkeypatch, version):
    """Each block chooses its own path; a block whose decays overflow exp(-g) takes the pairwise one."""
    monkeypatch.setattr(wkv7_mod, "BLOCK_TOKENS", 16)
    kw = {"min_log_decay": -20.0} if version == "v7" else {"log_w": (5.0, 7.0)}
    x, s0, reference, chunked = _case(version, 1, 40, 2, 8, "batch", seed=4, **kw)
    o1, s1 = reference(*x, initial_state=s0)
    o2, s2 = chunked(*x, initial_state=s0, chunk_size=16)
    assert torch.isfinite(o2).all() and rel(o2, o1) < 1e-10 and rel(s2, s1) < 1e-10


def test_blocks_keep_fp32_and_bf16_contracts():
    x = [t.to(torch.bfloat16) for t in inputs7(1, 2100, 1, 4, seed=6)]
    o, S = wkv7_mod.wkv7_chunked(*x)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32 and o.shape == (1, 2100, 1, 4)
    x6 = [t.to(torch.bfloat16) for t in inputs6(1, 2100, 1, 4, seed=6)]
    o6, S6 = wkv6_mod.wkv6_chunked(*x6)
    assert o6.dtype == torch.bfloat16 and S6.dtype == torch.float32 and o6.shape == (1, 2100, 1, 4)


def _bytes_allocated_by_forward_and_backward(version, T, H=1, N=8):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, T, H, N, generator=g) * 0.1 for _ in range(6 if version == "v7" else 4)]
    xs[1] = -torch.rand(1, T, H, N, generator=g)  # log decays
    if version == "v6":
        xs.append(torch.randn(H, N, generator=g))
    fn = wkv7_mod.wkv7_chunked if version == "v7" else wkv6_mod.wkv6_chunked
    leaves = [x.requires_grad_() for x in xs]
    with profile(profile_memory=True) as prof:
        o, S = fn(*leaves, chunk_size=16)
        (o.sum() + S.sum()).backward()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("version", ["v7", "v6"])
def test_allocations_grow_linearly_with_T(version):
    """4x the tokens (512 -> 2048, two blocks) allocates about 4.1x the bytes; the old per-chunk slicing gave ~12.9x."""
    small = _bytes_allocated_by_forward_and_backward(version, 512)
    large = _bytes_allocated_by_forward_and_backward(version, 2048)
    assert small > 0
    assert large / small < 6.0, (small, large)
