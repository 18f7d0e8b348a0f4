"""The WKV-6 op: the chunked form against the one-step reference, values and gradients, and the dispatch."""
import pytest
import torch

from rwkv_peft.ops.wkv6 import select_backend, wkv6, wkv6_chunked, wkv6_recurrent


def inputs(B, T, H, N, dtype=torch.float64, log_w=(-3.0, 1.0), seed=0):
    """r, w, k, v [B, T, H, N] and u [H, N]; ``w = -exp(z)`` with z uniform in ``log_w`` (as the model forms it)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    lo, hi = log_w
    w = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=dtype) * (hi - lo) + lo)
    u = torch.randn(H, N, generator=g, dtype=dtype) * 0.5
    return [r, w, k, v, u]


def initial(kind, B, H, N, dtype=torch.float64, seed=9):
    g = torch.Generator().manual_seed(seed)
    return {"none": None, "batch": torch.randn(B, H, N, N, generator=g, dtype=dtype),
            "shared": torch.randn(H, N, N, generator=g, dtype=dtype)}[kind]


def rel(x, y):
    return float((x - y).detach().abs().max() / y.detach().abs().max())


@pytest.mark.parametrize("T", [1, 5, 16, 17, 50])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("state", ["none", "batch", "shared"])
def test_chunked_matches_recurrent(T, chunk, state):
    B, H, N = 2, 3, 8
    x, s0 = inputs(B, T, H, N), initial(state, B, H, N)
    o1, s1 = wkv6_recurrent(*x, initial_state=s0)
    o2, s2 = wkv6_chunked(*x, initial_state=s0, chunk_size=chunk)
    assert o2.shape == (B, T, H, N) and s2.shape == (B, H, N, N)
    assert rel(o2, o1) < 1e-12 and rel(s2, s1) < 1e-12


@pytest.mark.parametrize("log_w", [(-3.0, 1.0), (5.0, 7.0), (-14.0, -12.0)], ids=["typical", "decay~0", "decay~1"])
@pytest.mark.parametrize("state,chunk", [("batch", 8), ("shared", 6)])
def test_gradients_match_recurrent(log_w, state, chunk):
    """Every input and the initial state, in float64; 'decay~0' (w ~ -1000 per step) takes the pairwise path."""
    B, T, H, N = 2, 21, 2, 8
    x, s0 = inputs(B, T, H, N, log_w=log_w, seed=1), initial(state, B, H, N)
    leaves = [t.requires_grad_() for t in x + [s0]]
    g = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)

    def grads(fn, **kw):
        o, S = fn(*leaves[:5], initial_state=leaves[5], **kw)
        return [o, S] + list(torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves))

    want = grads(wkv6_recurrent)
    got = grads(wkv6_chunked, chunk_size=chunk)
    for name, a, b in zip(["o", "S", "dr", "dw", "dk", "dv", "du", "ds0"], got, want):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-10, name


@pytest.mark.parametrize("log_w", [(5.0, 7.0), (-14.0, -12.0)], ids=["decay~0", "decay~1"])
def test_extreme_decays_stay_finite_and_exact_in_fp32(log_w):
    x = inputs(1, 40, 2, 8, dtype=torch.float32, log_w=log_w, seed=3)
    o1, s1 = wkv6_recurrent(*(t.double() for t in x))
    o2, s2 = wkv6_chunked(*x, chunk_size=16)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    assert rel(o2.double(), o1) < 1e-5 and rel(s2.double(), s1) < 1e-5


@pytest.mark.parametrize("chunk", [16, 10, 7])
def test_mixed_decays_keep_size_one_terms_exact_in_fp32(chunk):
    """Near-zero decays early in a chunk must not cost precision to the near-one decays after them."""
    r, w, k, v, u = inputs(1, 48, 2, 8, dtype=torch.float32, log_w=(-6.0, -4.0), seed=5)
    w[:, 1:4] = -900.0                                       # state wiped: (almost) nothing before t=4 survives
    w[:, 30] = -70.0
    o1, s1 = wkv6_recurrent(*(t.double() for t in (r, w, k, v, u)))
    o2, s2 = wkv6_chunked(r, w, k, v, u, chunk_size=chunk)
    assert rel(o2.double(), o1) < 2e-6 and rel(s2.double(), s1) < 2e-6


def test_fp32_close_to_fp64_and_state_stays_fp32_for_bf16():
    x = inputs(2, 45, 2, 16, dtype=torch.float32, seed=4)
    o64, s64 = wkv6_recurrent(*(t.double() for t in x))
    o32, s32 = wkv6_chunked(*x)
    assert o32.dtype == s32.dtype == torch.float32
    assert rel(o32.double(), o64) < 1e-5 and rel(s32.double(), s64) < 1e-5
    r, w, k, v, u = x
    ob, sb = wkv6(r.bfloat16(), w, k.bfloat16(), v.bfloat16(), u)
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_bad_shapes_are_refused():
    r, w, k, v, u = inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="u has shape"):
        wkv6_chunked(r, w, k, v, u[0])
    with pytest.raises(ValueError, match="k has shape"):
        wkv6_recurrent(r, w, k[:, :3], v, u)
    with pytest.raises(ValueError, match="initial_state has shape"):
        wkv6(r, w, k, v, u, initial_state=torch.zeros(3, 2, 8, 8, dtype=torch.float64))


def test_dispatch_reads_the_environment_at_call_time(monkeypatch):
    x = inputs(1, 9, 2, 8)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "torch")
    assert select_backend(torch.device("cpu"))[0] == "torch"
    o, s = wkv6(*x)
    o2, s2 = wkv6_chunked(*x)
    assert torch.equal(o, o2) and torch.equal(s, s2)
    one = [t[:, :1] for t in x[:4]] + [x[4]]
    assert all(torch.equal(a, b) for a, b in zip(wkv6(*one), wkv6_recurrent(*one)))
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="no RWKV-6 CUDA kernel"):
        wkv6(*x)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "bogus")
    with pytest.raises(ValueError, match="not a WKV backend"):
        wkv6(*x)
    monkeypatch.delenv("RWKV_PEFT_KERNEL")
    assert select_backend(torch.device("cpu"))[0] == "torch"
    with pytest.raises(RuntimeError, match="no RWKV-6 CUDA kernel"):
        wkv6(*x, backend="cuda")
