"""The WKV-5 op: the chunked form against the one-step reference (values and gradients), against the official
package's RWKV-5.2 time mix, O(T) backward, and the dispatch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkv_peft.ops.wkv5 import select_backend, wkv5, wkv5_chunked, wkv5_recurrent

OFFICIAL_ATT = Path(__file__).with_name("official_wkv5_att.py")


def inputs(B, T, H, N, dtype=torch.float64, log_w=(-3.0, 1.0), per_token=False, seed=0):
    """r, w, k, v and u; ``w = -exp(z)`` with z uniform in ``log_w`` (as the model forms it from time_decay),
    shaped [H, N] (RWKV-5.2: time-invariant) or [B, T, H, N] (``per_token``)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    lo, hi = log_w
    shape = (B, T, H, N) if per_token else (H, N)
    w = -torch.exp(torch.rand(*shape, generator=g, dtype=dtype) * (hi - lo) + lo)
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
@pytest.mark.parametrize("per_token", [False, True], ids=["w[H,N]", "w[B,T,H,N]"])
def test_chunked_matches_recurrent(T, chunk, state, per_token):
    B, H, N = 2, 3, 8
    x, s0 = inputs(B, T, H, N, per_token=per_token), initial(state, B, H, N)
    o1, s1 = wkv5_recurrent(*x, initial_state=s0)
    o2, s2 = wkv5_chunked(*x, initial_state=s0, chunk_size=chunk)
    assert o2.shape == (B, T, H, N) and s2.shape == (B, H, N, N)
    assert rel(o2, o1) < 1e-12 and rel(s2, s1) < 1e-12


def test_recurrence_by_hand():
    """One head, N = 1: o_t = r_t (S_{t-1} + u k_t v_t), S_t = e^w S_{t-1} + k_t v_t."""
    r, k, v = (torch.tensor([[[[a]], [[b]], [[c]]]], dtype=torch.float64) for a, b, c in
               ((1.0, 2.0, -1.0), (0.5, -1.0, 2.0), (3.0, 1.0, 0.5)))
    w, u, s0 = torch.tensor([[-0.5]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64), 2.0
    S, want = s0, []
    for t in range(3):
        kv = k[0, t, 0, 0] * v[0, t, 0, 0]
        want.append(r[0, t, 0, 0] * (S + 0.25 * kv))
        S = torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * S + kv
    for fn in (wkv5_recurrent, lambda *a, **kw: wkv5_chunked(*a, chunk_size=2, **kw)):
        o, s = fn(r, w, k, v, u, initial_state=torch.full((1, 1, 1, 1), s0, dtype=torch.float64))
        assert torch.allclose(o.flatten(), torch.stack(want)) and torch.allclose(s.flatten(), S.reshape(1))


@pytest.mark.parametrize("log_w", [(-3.0, 1.0), (5.0, 7.0), (-14.0, -12.0)], ids=["typical", "decay~0", "decay~1"])
@pytest.mark.parametrize("state,chunk,per_token", [("batch", 8, False), ("shared", 6, False), ("batch", 5, True)])
def test_gradients_match_recurrent(log_w, state, chunk, per_token):
    """Every input and the initial state, in float64; 'decay~0' (w ~ -1000 per step) takes the pairwise path."""
    B, T, H, N = 2, 21, 2, 8
    x, s0 = inputs(B, T, H, N, log_w=log_w, per_token=per_token, seed=1), initial(state, B, H, N)
    leaves = [t.requires_grad_() for t in x + [s0]]
    g = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)

    def grads(fn, **kw):
        o, S = fn(*leaves[:5], initial_state=leaves[5], **kw)
        return [o, S] + list(torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves))

    want = grads(wkv5_recurrent)
    got = grads(wkv5_chunked, chunk_size=chunk)
    for name, a, b in zip(["o", "S", "dr", "dw", "dk", "dv", "du", "ds0"], got, want):
        assert torch.isfinite(a).all(), name
        assert a.shape == b.shape, name
        assert rel(a, b) < 1e-10, name


def test_gradcheck_small():
    x = inputs(1, 7, 1, 3, seed=4)
    s0 = initial("batch", 1, 1, 3)
    leaves = [t.requires_grad_() for t in x + [s0]]
    fn = lambda r, w, k, v, u, s: wkv5_chunked(r, w, k, v, u, initial_state=s, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("log_w", [(5.0, 7.0), (-14.0, -12.0)], ids=["decay~0", "decay~1"])
def test_extreme_decays_stay_finite_and_exact_in_fp32(log_w):
    x = inputs(1, 40, 2, 8, dtype=torch.float32, log_w=log_w, seed=3)
    o1, s1 = wkv5_recurrent(*(t.double() for t in x))
    o2, s2 = wkv5_chunked(*x, chunk_size=16)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    assert rel(o2.double(), o1) < 1e-5 and rel(s2.double(), s1) < 1e-5


def test_fp32_close_to_fp64_and_state_stays_fp32_for_bf16():
    x = inputs(2, 45, 2, 16, dtype=torch.float32, seed=4)
    o64, s64 = wkv5_recurrent(*(t.double() for t in x))
    o32, s32 = wkv5_chunked(*x)
    assert o32.dtype == s32.dtype == torch.float32
    assert rel(o32.double(), o64) < 1e-5 and rel(s32.double(), s64) < 1e-5
    r, w, k, v, u = x
    ob, sb = wkv5(r.bfloat16(), w, k.bfloat16(), v.bfloat16(), u)
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_backward_is_linear_in_length():
    """No per-chunk slice of a whole-sequence tensor in the graph (the backward of each would write a
    full-length gradient buffer: O(T^2) in all): the slicing nodes do not grow with T, the graph grows linearly."""
    def nodes(T):
        x = [t.requires_grad_() for t in inputs(1, T, 1, 4, dtype=torch.float32, seed=6)]
        o, S = wkv5_chunked(*x, chunk_size=4)
        seen, todo = set(), [o.grad_fn, S.grad_fn]
        while todo:
            f = todo.pop()
            if f is None or f in seen:
                continue
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
        slices = sum(type(f).__name__ in ("SliceBackward0", "SelectBackward0") for f in seen)
        return len(seen), slices
    (n1, s1), (n2, s2) = nodes(64), nodes(128)
    assert s1 == s2  # the number of slicing nodes does not grow with the number of chunks
    assert n2 <= 2 * n1 + 10


def test_bad_shapes_are_refused():
    r, w, k, v, u = inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="u has shape"):
        wkv5_chunked(r, w, k, v, u[0])
    with pytest.raises(ValueError, match="w has shape"):
        wkv5_chunked(r, w[0], k, v, u)
    with pytest.raises(ValueError, match="k has shape"):
        wkv5_recurrent(r, w, k[:, :3], v, u)
    with pytest.raises(ValueError, match="initial_state has shape"):
        wkv5(r, w, k, v, u, initial_state=torch.zeros(3, 2, 8, 8, dtype=torch.float64))


def test_dispatch_reads_the_environment_at_call_time(monkeypatch):
    x = inputs(1, 9, 2, 8)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "torch")
    assert select_backend(torch.device("cpu"))[0] == "torch"
    o, s = wkv5(*x)
    o2, s2 = wkv5_chunked(*x)
    assert torch.equal(o, o2) and torch.equal(s, s2)
    one = [t[:, :1] for t in (x[0],)] + [x[1]] + [t[:, :1] for t in x[2:4]] + [x[4]]
    assert all(torch.equal(a, b) for a, b in zip(wkv5(*one), wkv5_recurrent(*one)))
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="no RWKV-5 CUDA kernel"):
        wkv5(*x)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "bogus")
    with pytest.raises(ValueError, match="not a WKV backend"):
        wkv5(*x)
    monkeypatch.delenv("RWKV_PEFT_KERNEL")
    with pytest.raises(RuntimeError, match="no RWKV-5 CUDA kernel"):
        wkv5(*x, backend="cuda")


# ---- against the official package's RWKV-5.2 time mix ---------------------------------------------------------

def _our_time_mix(z, x, sx, s, wkv):
    """The package's att_seq_v5_2 / att_one_v5_1 pipeline around our op: returns (x + out, last xx, state)."""
    H, N = z["time_decay"].shape
    T, C = x.shape
    xx = F.layer_norm(x, (C,), weight=z["ln_w"], bias=z["ln_b"])
    prev = torch.cat([sx[None], xx[:-1]])
    mix = lambda m: xx * m + prev * (1 - m)  # noqa: E731
    r, k, v = (mix(z[m]) @ z[w] for m, w in (("r_mix", "rw"), ("k_mix", "kw"), ("v_mix", "vw")))
    g = F.silu(mix(z["g_mix"]) @ z["gw"])
    heads = lambda t: t.view(1, T, H, N)  # noqa: E731
    o, s = wkv(heads(r), -torch.exp(z["time_decay"]), heads(k), heads(v), z["time_faaaa"], initial_state=s[None])
    o = F.group_norm(o.reshape(T, C), H, z["lx_w"], z["lx_b"], eps=64e-5)
    return x + (o * g) @ z["ow"], xx[-1], s[0]


@pytest.fixture(scope="module")
def official_att(tmp_path_factory):
    d = tmp_path_factory.mktemp("wkv5_att")
    g = torch.Generator().manual_seed(11)
    H, N, T = 2, 64, 23
    C = H * N
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    uni = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    z = {"x": rnd(T, C), "sx": rnd(C), "s": rnd(H, N, N, scale=0.3),
         "ln_w": uni(C) * 0.4 + 0.8, "ln_b": rnd(C, scale=0.1), "lx_w": uni(C) * 0.5 + 0.5, "lx_b": rnd(C, scale=0.05),
         "k_mix": uni(C), "v_mix": uni(C), "r_mix": uni(C), "g_mix": uni(C),
         "time_decay": uni(H, N) * 7 - 6, "time_faaaa": rnd(H, N, scale=0.5)}
    for name in ("kw", "vw", "rw", "gw", "ow"):
        z[name] = rnd(C, C, scale=C ** -0.5)
    torch.save(z, d / "in.pt")
    env = {**os.environ, "RWKV_V7_ON": "0", "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
    proc = subprocess.run([sys.executable, str(OFFICIAL_ATT), str(d / "in.pt"), str(d / "out.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"official package failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return z, torch.load(d / "out.pt", weights_only=True)


@pytest.mark.parametrize("path", ["chunked", "recurrent"])
def test_matches_official_time_mix(official_att, path):
    z, ref = official_att
    wkv = {"chunked": lambda *a, **kw: wkv5_chunked(*a, chunk_size=8, **kw), "recurrent": wkv5_recurrent}[path]
    with torch.no_grad():
        out, xx_last, s = _our_time_mix(z, z["x"], z["sx"], z["s"], wkv)
        one = _our_time_mix(z, z["x"][:1], z["sx"], z["s"], wkv)
    for got, want in zip((out, xx_last, s), ref["seq"]):
        assert got.shape == want.shape and float((got - want).abs().max() / want.abs().max()) <= 1e-5
    for got, want in zip((one[0][0], one[1], one[2]), ref["one"]):
        assert got.shape == want.shape and float((got - want).abs().max() / want.abs().max()) <= 1e-5
