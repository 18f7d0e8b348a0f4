"""The WKV-7 op: the chunked form against the one-step reference, values and gradients, and the dispatch."""
import pytest
import torch

from rwkv_peft.ops.wkv7 import select_backend, wkv7, wkv7_chunked, wkv7_recurrent


def inputs(B, T, H, N, dtype=torch.float64, min_log_decay=-0.6065, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g, dtype=dtype) * min_log_decay          # log decay in [min, 0]
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    return [r, w, k, v, -kk, kk * gate]


def rel(x, y):
    return float((x - y).abs().max() / y.abs().max())


@pytest.mark.parametrize("T", [1, 5, 16, 17, 50])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("state", ["none", "batch", "shared"])
def test_chunked_matches_recurrent(T, chunk, state):
    B, H, N = 2, 3, 8
    x = inputs(B, T, H, N)
    s0 = {"none": None, "batch": torch.randn(B, H, N, N, dtype=torch.float64),
          "shared": torch.randn(H, N, N, dtype=torch.float64)}[state]
    o1, s1 = wkv7_recurrent(*x, initial_state=s0)
    o2, s2 = wkv7_chunked(*x, initial_state=s0, chunk_size=chunk)
    assert rel(o2, o1) < 1e-12 and rel(s2, s1) < 1e-12


@pytest.mark.parametrize("min_log_decay", [-20.0, -1e-4])
def test_extreme_decays_stay_finite_and_exact(min_log_decay):
    x = inputs(1, 40, 2, 8, min_log_decay=min_log_decay, seed=3)
    o1, s1 = wkv7_recurrent(*x)
    o2, s2 = wkv7_chunked(*x, chunk_size=16)
    assert torch.isfinite(o2).all() and rel(o2, o1) < 1e-10 and rel(s2, s1) < 1e-10


def test_fp32_chunked_close_to_fp64_reference():
    x64 = inputs(2, 64, 2, 16, seed=5)
    o_ref, s_ref = wkv7_recurrent(*x64)
    o, s = wkv7_chunked(*[t.float() for t in x64])
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(o.double(), o_ref) < 1e-5 and rel(s.double(), s_ref) < 1e-5


@pytest.mark.parametrize("shared_state", [False, True])
def test_gradients_of_every_input_match_in_float64(shared_state):
    B, T, H, N = 2, 21, 2, 4
    base = inputs(B, T, H, N, seed=7)
    s0 = torch.randn(*((H, N, N) if shared_state else (B, H, N, N)), dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    do = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    ds = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)   # a gradient arriving on the final state

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in base] + [s0.clone().requires_grad_()]
        o, s = fn(*leaves[:6], initial_state=leaves[6], **kw)
        ((o * do).sum() + (s * ds).sum()).backward()
        return [t.grad for t in leaves]

    for name, g_ref, g_chunk in zip("r w k v a b s0".split(), grads(wkv7_recurrent), grads(wkv7_chunked, chunk_size=8)):
        assert rel(g_chunk, g_ref) < 1e-10, name


def test_gradcheck_recurrent_reference():
    leaves = [t.requires_grad_() for t in inputs(1, 4, 1, 3, seed=2)]
    s0 = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: wkv7_recurrent(*a[:6], initial_state=a[6]), (*leaves, s0))


def test_dispatch_and_override(monkeypatch):
    x = inputs(1, 9, 1, 4)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "torch")
    assert select_backend(torch.device("cpu"))[0] == "torch"
    o, _ = wkv7(*x)
    assert rel(o, wkv7_recurrent(*x)[0]) < 1e-12
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="RWKV_PEFT_KERNEL=cuda"):
        wkv7(*x)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "fast")
    with pytest.raises(ValueError, match="not a WKV backend"):
        wkv7(*x)
    monkeypatch.delenv("RWKV_PEFT_KERNEL")
    assert select_backend(torch.device("cpu")) == ("torch", "tensors on cpu")


def test_bad_shapes_are_named():
    x = inputs(1, 4, 1, 4)
    x[2] = x[2][:, :3]
    with pytest.raises(ValueError, match="k has shape"):
        wkv7_chunked(*x)
    with pytest.raises(ValueError, match="initial_state has shape"):
        wkv7_chunked(*inputs(1, 4, 1, 4), initial_state=torch.zeros(2, 2, 2))
