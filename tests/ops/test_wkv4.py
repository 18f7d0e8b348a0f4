"""The WKV-4 op: the recurrence against its plain (unstabilised) definition, the chunked form against the
one-step reference (values and gradients, gradcheck), padding, extreme ranges, and the official package's own
RWKV-4 time mix (``att_seq``) with a state carried in."""
import math

import pytest
import torch

from rwkv_peft.ops.wkv4 import EMPTY_PP, empty_state, select_backend, wkv4, wkv4_chunked, wkv4_recurrent
from tests.factories_v4 import make_blinkdl_v4, official_reference_v4, rel_err


def inputs(B, T, A, dtype=torch.float64, decay=(-5.0, 3.0), k_scale=1.0, seed=0):
    """w = -exp(time_decay) with time_decay uniform in ``decay``; u, k, v normal (k times ``k_scale``)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = decay
    w = -torch.exp(torch.rand(A, generator=g, dtype=dtype) * (hi - lo) + lo)
    u = torch.randn(A, generator=g, dtype=dtype) * 0.5
    k = torch.randn(B, T, A, generator=g, dtype=dtype) * k_scale
    v = torch.randn(B, T, A, generator=g, dtype=dtype)
    return [w, u, k, v]


def state(kind, B, A, dtype=torch.float64, seed=9):
    """None, or a reachable (aa, bb, pp): bb > 0, |aa| <= bb * |v|-ish, pp of the size k gives."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, A) if kind == "batch" else (A,)
    if kind == "none":
        return None
    bb = torch.rand(*shape, generator=g, dtype=dtype) * 3 + 0.5
    aa = torch.randn(*shape, generator=g, dtype=dtype) * bb
    pp = torch.randn(*shape, generator=g, dtype=dtype)
    return torch.stack([aa, bb, pp], dim=-2)


def padding(B, T, seed=3):
    m = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[0, :4] = False  # leading padding: read-out of an empty state
    return m


def naive(w, u, k, v, s0=None):
    """The definition, without the max trick (float64, small exponents only)."""
    B, T, A = k.shape
    if s0 is None:
        a, b = torch.zeros(B, A, dtype=k.dtype), torch.zeros(B, A, dtype=k.dtype)
    else:
        a, b = s0[:, 0] * torch.exp(s0[:, 2]), s0[:, 1] * torch.exp(s0[:, 2])
    outs = []
    for t in range(T):
        e = torch.exp(u + k[:, t])
        outs.append((a + e * v[:, t]) / (b + e))
        a = torch.exp(w) * a + torch.exp(k[:, t]) * v[:, t]
        b = torch.exp(w) * b + torch.exp(k[:, t])
    return torch.stack(outs, 1), a, b


@pytest.mark.parametrize("s0", ["none", "batch"])
def test_recurrence_is_the_definition(s0):
    x, s = inputs(2, 13, 5), state(s0, 2, 5)
    o, S = wkv4_recurrent(*x, initial_state=s)
    want, a, b = naive(*x, s)
    assert torch.allclose(o, want, rtol=1e-12, atol=1e-12)
    # the final state is (a, b) held as (aa, bb) * e^pp, pp the largest exponent seen (as the package keeps it)
    scale = torch.exp(S[:, 2])
    assert torch.allclose(S[:, 0] * scale, a, rtol=1e-12) and torch.allclose(S[:, 1] * scale, b, rtol=1e-12)


def test_empty_state_is_the_packages():
    s = empty_state(2, 4)
    assert s.shape == (2, 3, 4) and s.dtype == torch.float32
    assert torch.equal(s[:, :2], torch.zeros(2, 2, 4)) and torch.equal(s[:, 2], torch.full((2, 4), EMPTY_PP))
    x = inputs(2, 6, 4, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(wkv4_recurrent(*x), wkv4_recurrent(*x, initial_state=s)))


@pytest.mark.parametrize("T", [1, 5, 16, 17, 50])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("s0", ["none", "batch", "shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_chunked_matches_recurrent(T, chunk, s0, masked):
    B, A = 2, 6
    x, s, m = inputs(B, T, A, k_scale=3.0), state(s0, B, A), padding(B, T) if masked else None
    o1, S1 = wkv4_recurrent(*x, initial_state=s, mask=m)
    o2, S2 = wkv4_chunked(*x, initial_state=s, mask=m, chunk_size=chunk)
    assert o2.shape == (B, T, A) and S2.shape == (B, 3, A)
    assert rel_err(o2, o1) < 1e-12 and rel_err(S2[:, :2], S1[:, :2]) < 1e-12
    assert torch.allclose(S2[:, 2], S1[:, 2], rtol=1e-12, atol=1e-12)


def test_padding_leaves_the_state_untouched():
    """A padded token writes nothing and does not decay: the state equals the one of the real tokens alone."""
    x = inputs(1, 12, 4)
    m = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    real = m[0]
    alone = [t[:, real] if t.dim() == 3 else t for t in x]
    for fn in (wkv4_recurrent, lambda *a, **kw: wkv4_chunked(*a, chunk_size=5, **kw)):
        o, S = fn(*x, mask=m)
        o_alone, S_alone = wkv4_recurrent(*alone)
        assert torch.allclose(o[:, real], o_alone, rtol=1e-13) and torch.equal(o[0, :2], torch.zeros(2, 4))
        assert torch.allclose(S, S_alone, rtol=1e-13)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("fn", ["recurrent", "chunked"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_gradcheck(fn, masked):
    B, T, A = 2, 7, 3
    x, s = inputs(B, T, A, seed=4), state("batch", B, A, seed=5)
    m = padding(B, T, seed=6) if masked else None
    leaves = [t.clone().requires_grad_() for t in x + [s]]
    op = wkv4_recurrent if fn == "recurrent" else (lambda *a, **kw: wkv4_chunked(*a, chunk_size=3, **kw))
    assert torch.autograd.gradcheck(lambda w, u, k, v, s0: op(w, u, k, v, initial_state=s0, mask=m), leaves)


@pytest.mark.parametrize("decay,k_scale", [((-5.0, 3.0), 1.0), ((5.0, 7.0), 3.0), ((-14.0, -12.0), 5.0)],
                         ids=["typical", "decay~0", "decay~1"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_gradients_match_recurrent(decay, k_scale, masked):
    """Every input and the initial state, in float64, a loss on the outputs and on all of (aa, bb, pp)."""
    B, T, A = 2, 21, 5
    x, s = inputs(B, T, A, decay=decay, k_scale=k_scale, seed=1), state("batch", B, A)
    m = padding(B, T) if masked else None
    leaves = [t.clone().requires_grad_() for t in x + [s]]
    g = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, A, generator=g, dtype=torch.float64)
    dS = torch.randn(B, 3, A, generator=g, dtype=torch.float64)

    def grads(fn, **kw):
        o, S = fn(*leaves[:4], initial_state=leaves[4], mask=m, **kw)
        return [o, S] + list(torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves))

    for a, b in zip(grads(wkv4_chunked, chunk_size=8), grads(wkv4_recurrent)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k_scale,decay", [(30.0, (-5.0, 3.0)), (1.0, (6.0, 8.0)), (60.0, (6.0, 8.0))])
def test_extreme_ranges_stay_finite_in_fp32(k_scale, decay):
    """k in an exponent (|k| up to ~200) and decays down to e^-3000 per token: the max trick keeps fp32 finite
    and close to the float64 reference, in both forms."""
    x64 = inputs(2, 40, 8, decay=decay, k_scale=k_scale, seed=7)
    x32 = [t.float() for t in x64]
    want, S_want = wkv4_recurrent(*x64)
    for o, S in (wkv4_recurrent(*x32), wkv4_chunked(*x32, chunk_size=16)):
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        assert rel_err(o, want) < 1e-5
        assert rel_err(S[:, 2], S_want[:, 2]) < 1e-5


def test_bf16_inputs_keep_an_fp32_state():
    x = [t.bfloat16() for t in inputs(1, 9, 4, dtype=torch.float32)]
    o, S = wkv4(*x)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32


def test_dispatch(monkeypatch):
    x = inputs(1, 9, 4)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="no RWKV-4 CUDA kernel"):
        wkv4(*x)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "torch")
    assert select_backend(torch.device("cpu"))[0] == "torch"
    o, S = wkv4(*x)
    assert torch.allclose(o, wkv4_recurrent(*x)[0], rtol=1e-12)
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "nope")
    with pytest.raises(ValueError, match="not a WKV backend"):
        wkv4(*x)


def test_bad_shapes():
    w, u, k, v = inputs(2, 5, 4)
    with pytest.raises(ValueError, match=r"w has shape \(3,\)"):
        wkv4(w[:3], u, k, v)
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 2, 4\)"):
        wkv4(w, u, k, v, initial_state=torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"mask has shape"):
        wkv4(w, u, k, v, mask=torch.ones(2, 4))


def test_matches_the_official_att_seq(tmp_path):
    """Our RWKV-4 time mix of layer 0 (ln1, token shift, wkv, output, residual) against the package's own
    ``att_seq`` on the same inputs, from a non-empty carried-in state, final state included."""
    from rwkv_peft.models.rwkv4.convert_rwkv4 import load_blinkdl_model
    sd = make_blinkdl_v4(61, 64, 1, seed=11)
    torch.save(sd, tmp_path / "m.pth")
    g = torch.Generator().manual_seed(12)
    T, C = 19, 64
    inp = {"x": torch.randn(T, C, generator=g), "sx": torch.randn(C, generator=g)}
    s = state("shared", 1, C, dtype=torch.float32, seed=13)
    inp["aa"], inp["bb"], inp["pp"] = s[0], s[1], s[2] * 4
    torch.save(inp, tmp_path / "att.pt")
    ref = official_reference_v4(tmp_path / "m.pth", {"att": str(tmp_path / "att.pt")}, tmp_path / "ref.pt")["att"]
    block = load_blinkdl_model(sd).model.blocks[0]
    x = inp["x"][None]
    wkv_in = torch.stack([inp["aa"], inp["bb"], inp["pp"]])[None]
    with torch.no_grad():
        dx, _, shift, wkv_out = block.att(block.ln1(x), None, inp["sx"][None], wkv_in, None)
    assert rel_err(x + dx, ref[0][None]) <= 1e-5 and rel_err(shift[0], ref[1]) <= 1e-6
    for i in range(3):
        assert rel_err(wkv_out[0, i], ref[2 + i]) <= 1e-5
    assert not math.isnan(float(dx.sum()))
