"""The flash-linear-attention path (rwkv_peft/ops/fla.py) on the CPU, against a stand-in for fla's ops.

fla runs only on a GPU, so here a stand-in module takes its place: it implements what fla documents for
``chunk_rwkv7`` / ``chunk_rwkv6`` - states ``[N, H, K, V]`` (key first), RWKV-6 arguments ``r, k, v, w, u``,
``scale`` applied to ``r``, ``cu_seqlens`` splitting a batch of one into sequences with a state each - written
here from those definitions, not from our ops. The tests hold our adapter (layouts, argument order, scale,
per-sequence states, gradients to the initial state) to our references, and the dispatch to its rules. The same
comparisons against fla itself are GPU tests (tests/ops/test_fla.py::test_real_fla_*, marked cuda).
"""
import importlib
import sys
import types

import pytest
import torch

from rwkv_peft.ops import fla as fla_path
from rwkv_peft.ops.wkv6 import wkv6_recurrent
from rwkv_peft.ops.wkv7 import wkv7_recurrent

wkv7_mod = importlib.import_module("rwkv_peft.ops.wkv7")  # (rwkv_peft.ops exports the functions under these names)
wkv6_mod = importlib.import_module("rwkv_peft.ops.wkv6")


def _split(x, cu):
    """[1, T, ...] -> the sequences cu_seqlens marks (or [B, T, ...] -> its rows)."""
    if cu is None:
        return list(x.unbind(0))
    return [x[0, int(s):int(e)] for s, e in zip(cu[:-1], cu[1:])]


def _stand_in_rwkv7(r, w, k, v, a, b, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    head_first=False):
    """fla's DPLR recurrence on a [K, V] state: h = diag(exp(w)) h + b (a^T h) + k v^T; o = h^T (scale r)."""
    assert not head_first
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    outs, finals = [], []
    seqs = list(zip(*(_split(t, cu_seqlens) for t in (r, w, k, v, a, b))))
    H, K = r.shape[2], r.shape[3]
    for n, (rr, ww, kk, vv, aa, bb) in enumerate(seqs):
        h = torch.zeros(H, K, K, dtype=torch.float64) if initial_state is None else initial_state[n].double()
        o = []
        for t in range(rr.shape[0]):
            rt, wt, kt, vt, at, bt = (x[t].double() for x in (rr, ww, kk, vv, aa, bb))       # [H, K]
            h = torch.exp(wt)[..., None] * h + bt[..., None] * (at[..., None] * h).sum(-2, keepdim=True) \
                + kt[..., None] * vt[:, None, :]
            o.append((h * (scale * rt)[..., None]).sum(-2))                                     # h^T r  [H, V]
        outs.append(torch.stack(o))
        finals.append(h)
    o = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return o.to(r.dtype), torch.stack(finals).float()


def _stand_in_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    **kwargs):
    """fla's RWKV-6 on a [K, V] state: o = h^T (scale r) + ((scale r) . (u k)) v; h = diag(exp(w)) h + k v^T."""
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    outs, finals = [], []
    seqs = list(zip(*(_split(t, cu_seqlens) for t in (r, k, v, w))))
    H, K = r.shape[2], r.shape[3]
    for n, (rr, kk, vv, ww) in enumerate(seqs):
        h = torch.zeros(H, K, K, dtype=torch.float64) if initial_state is None else initial_state[n].double()
        o = []
        for t in range(rr.shape[0]):
            rt, kt, vt, wt = (x[t].double() * (scale if i == 0 else 1) for i, x in enumerate((rr, kk, vv, ww)))
            o.append((h * rt[..., None]).sum(-2) + (rt * u.double() * kt).sum(-1, keepdim=True) * vt)
            h = torch.exp(wt)[..., None] * h + kt[..., None] * vt[:, None, :]
        outs.append(torch.stack(o))
        finals.append(h)
    o = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return o.to(r.dtype), torch.stack(finals).float()


@pytest.fixture
def stand_in(monkeypatch):
    mods = {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"),
            "fla.ops.rwkv7": types.ModuleType("fla.ops.rwkv7"), "fla.ops.rwkv6": types.ModuleType("fla.ops.rwkv6")}
    mods["fla.ops.rwkv7"].chunk_rwkv7 = _stand_in_rwkv7
    mods["fla.ops.rwkv6"].chunk_rwkv6 = _stand_in_rwkv6
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods


def _inputs7(B=2, T=9, H=2, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = -torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 2
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.5
    return [r, w, k, v, -kk, kk * gate], s0


def test_rwkv7_through_fla_matches_the_reference_and_its_gradients(stand_in):
    x, s0 = _inputs7()
    leaves = [t.clone().requires_grad_(True) for t in x + [s0]]
    o1, S1 = fla_path.wkv7_fla(*leaves[:6], initial_state=leaves[6])
    ref = [t.clone().requires_grad_(True) for t in x + [s0]]
    o2, S2 = wkv7_recurrent(*ref[:6], initial_state=ref[6])
    assert torch.allclose(o1, o2, atol=1e-9) and torch.allclose(S1.double(), S2, atol=1e-5)
    g = torch.randn_like(o2)
    (o1 * g).sum().backward()
    (o2 * g).sum().backward()
    for a, b in zip(leaves, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-8)
    shared = s0[0]  # one state for the batch (state tuning), [H, N, N]
    assert torch.allclose(fla_path.wkv7_fla(*x, initial_state=shared)[0], wkv7_recurrent(*x, initial_state=shared)[0])


def test_rwkv6_through_fla_keeps_the_key_value_layout(stand_in):
    x, s0 = _inputs7(seed=1)
    r, w, k, v = x[:4]
    u = torch.randn(2, 8, dtype=torch.float64)
    o1, S1 = fla_path.wkv6_fla(r, w, k, v, u, initial_state=s0)
    o2, S2 = wkv6_recurrent(r, w, k, v, u, initial_state=s0)
    assert torch.allclose(o1, o2, atol=1e-9) and torch.allclose(S1.double(), S2, atol=1e-5)


def test_cu_seqlens_gives_each_sample_its_own_state(stand_in):
    x, _ = _inputs7(B=1, T=12, seed=2)
    cu = torch.tensor([0, 5, 7, 12])
    states = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    o, S = fla_path.wkv7_fla(*x, initial_state=states, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, S_n = wkv7_recurrent(*(t[:, s:e] for t in x), initial_state=states[n:n + 1])
        assert torch.allclose(o[:, s:e], o_n, atol=1e-9) and torch.allclose(S[n].double(), S_n[0], atol=1e-5)


def test_dispatch_prefers_our_kernel_then_fla_then_torch(stand_in, monkeypatch):
    gpu = torch.device("cuda")
    from rwkv_peft.ops import wkv7_cuda
    monkeypatch.setattr(wkv7_cuda, "is_available", lambda: (False, "no nvcc"))
    assert wkv7_mod.select_backend(gpu, "auto")[0] == "fla"
    assert "no nvcc" in wkv7_mod.select_backend(gpu, "auto")[1]
    assert wkv6_mod.select_backend(gpu, "auto")[0] == "fla"
    monkeypatch.setattr(wkv7_cuda, "is_available", lambda: (True, "built for sm_90"))
    assert wkv7_mod.select_backend(gpu, "auto") == ("cuda", "built for sm_90")
    assert wkv7_mod.select_backend(gpu, "fla")[0] == "fla"
    assert wkv7_mod.select_backend(torch.device("cpu"), "auto")[0] == "torch"
    with pytest.raises(RuntimeError, match="fla was requested but the tensors are on cpu"):
        wkv7_mod.select_backend(torch.device("cpu"), "fla")


def test_without_fla_the_gpu_falls_back_to_torch_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla -> ImportError
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv7", None)
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv6", None)
    from rwkv_peft.ops import wkv7_cuda
    monkeypatch.setattr(wkv7_cuda, "is_available", lambda: (False, "no nvcc"))
    name, why = wkv7_mod.select_backend(torch.device("cuda"), "auto")
    assert name == "torch" and "no nvcc" in why and "rwkv-peft[fla]" in why
    with pytest.raises(RuntimeError, match="fla was requested"):
        wkv6_mod.select_backend(torch.device("cuda"), "fla")


@pytest.mark.cuda
def test_real_fla_matches_the_reference_on_the_gpu():
    pytest.importorskip("fla")
    x, s0 = _inputs7(B=2, T=64, H=2, N=64)
    x, s0 = [t.float().cuda() for t in x], s0.float().cuda()
    o1, S1 = fla_path.wkv7_fla(*x, initial_state=s0)
    o2, S2 = wkv7_recurrent(*x, initial_state=s0)
    assert (o1 - o2).abs().max() <= 1e-3 * o2.abs().max() and (S1 - S2).abs().max() <= 1e-3 * S2.abs().max()
    r, w, k, v = x[:4]
    u = torch.randn(2, 64, device="cuda")
    o1, S1 = fla_path.wkv6_fla(r, w, k, v, u, initial_state=s0)
    o2, S2 = wkv6_recurrent(r, w, k, v, u, initial_state=s0)
    assert (o1 - o2).abs().max() <= 1e-3 * o2.abs().max() and (S1 - S2).abs().max() <= 1e-3 * S2.abs().max()


@pytest.mark.parametrize("name", ["rwkv7", "rwkv6"])
def test_packed_rows_go_through_cu_seqlens_on_the_fla_path(stand_in, monkeypatch, tmp_path, name):
    """With fla as the path, a model's packed rows run as one flattened row with ``cu_seqlens`` (no per-sample
    gather): logits equal each sample alone, and the learned states' gradients the sum over the samples."""
    from tests.models.test_packed_rows import LENGTHS, _model, _packed
    calls = []
    for mod in (wkv7_mod, wkv6_mod):
        monkeypatch.setattr(mod, "select_backend", lambda device, backend=None: ("fla", "stand-in"))
    original = _stand_in_rwkv7 if name == "rwkv7" else _stand_in_rwkv6

    def spy(*a, **kw):
        calls.append(kw.get("cu_seqlens"))
        return original(*a, **kw)
    setattr(stand_in["fla.ops." + name], "chunk_" + name, spy)
    model = _model(name, tmp_path, True).double().train()
    samples, ids, pos, mask = _packed(LENGTHS, seed=8)
    packed = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    assert any(c is not None and c.numel() == len(samples) + 1 for c in calls)  # 6 samples, one flattened row
    weights = torch.randn(*packed.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model.zero_grad()
    (packed * weights * mask[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("time_state", "shift_state"))}
    model.zero_grad()
    total = 0
    for b, t, s in samples:
        alone = model(input_ids=s[None]).logits[0]
        assert torch.allclose(packed[b, t:t + len(s)], alone, atol=1e-8), (b, t)
        total = total + (alone * weights[b, t:t + len(s)]).sum()
    total.backward()
    for n, g in grads.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-7), n
