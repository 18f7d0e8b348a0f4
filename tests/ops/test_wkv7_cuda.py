"""The CUDA WKV-7 kernel: its algorithm (emulated, CPU), its build machinery (CPU), and the kernel itself
against the float64 reference on a GPU (marked ``cuda``; skipped where there is no GPU).

GPU run:            python -m pytest -q -m cuda tests/ops/test_wkv7_cuda.py
Memory checker:     compute-sanitizer --tool memcheck python -m pytest -q -m cuda -k small tests/ops/test_wkv7_cuda.py
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from rwkv_peft.ops import _cuda_build, wkv7_cuda
from rwkv_peft.ops.wkv7 import select_backend, wkv7, wkv7_chunked, wkv7_recurrent

from . import wkv7_cuda_emulation as emu
from . import wkv7_cuda_flat_emulation as flat


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """max|x - y| / max|y| (the absolute error where y is all zeros)."""
    x, y = x.detach().double(), y.detach().double()
    err = float((x - y).abs().max()) if x.numel() else 0.0
    den = float(y.abs().max()) if y.numel() else 0.0
    return err / den if den > 0 else err


def make_inputs(B, T, H, N, *, dtype=torch.float64, device="cpu", seed=0, decays="wide"):
    """r, w, k, v, a, b as the model makes them: a = -kk, b = kk * gate with kk unit-norm per head.

    decays="wide": log decays w = -exp(u), u ~ U(-8, 3): decays from ~2e-9 (w = -20) to ~0.9997;
    decays="model": the model's range, w in [-exp(-0.5), 0]."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    if decays == "wide":
        w = -torch.exp(torch.empty(B, T, H, N, dtype=torch.float64).uniform_(-8.0, 3.0, generator=g))
    else:
        w = -torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    return [x.to(dtype).to(device) for x in (r, w, k, v, -kk, kk * gate)]


def make_state(kind, B, H, N, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    shape = (B, H, N, N) if kind == "batch" else (H, N, N)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


# ============================================================================ CPU: the algorithm, emulated


@pytest.fixture
def one_thread():
    """The emulations run many tiny ops: one intra-op thread is several times faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("T,N,state,final_grad", [
    (1, 64, "batch", True), (5, 64, "none", False), (16, 64, "shared", True),
    (17, 64, "batch", False), (37, 64, "shared", True), (37, 32, "none", True),
])
def test_emulated_kernel_algorithm_matches_autograd(T, N, state, final_grad, one_thread):
    """The kernels' exact schedule (checkpoints every 16, sub-chunks of 4, per-thread partials) in float64."""
    B, H = 2, 2
    x = make_inputs(B, T, H, N, seed=T)
    s0 = make_state(state, B, H, N, seed=T + 1)
    g = torch.Generator().manual_seed(99)
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if final_grad else None

    leaves = [t.clone().requires_grad_() for t in x]
    s0_leaf = None if s0 is None else s0.clone().requires_grad_()
    o, sT = wkv7_recurrent(*leaves, initial_state=s0_leaf)
    loss = (o * dy).sum() + ((sT * dsT).sum() if dsT is not None else 0.0)
    loss.backward()

    y, sT_emu, grads = emu.forward_backward(*x, s0, dy, dsT)
    assert rel(y, o) < 1e-12 and rel(sT_emu, sT) < 1e-12
    refs = [t.grad for t in leaves] + [None if s0_leaf is None else s0_leaf.grad]
    for name, got, ref in zip("r w k v a b s0".split(), grads, refs):
        if ref is None:
            assert got is None, name
            continue
        assert got.shape == ref.shape, name
        assert rel(got, ref) < 1e-10, name


@pytest.mark.parametrize("B,T,H,N,state,final_grad,epp,ncb", [
    (2, 37, 2, 64, "shared", True, 8, 1), (1, 50, 1, 64, "batch", False, 4, 1), (2, 19, 3, 32, "none", True, 8, 1),
    (1, 1, 2, 64, "batch", True, 4, 1), (1, 33, 1, 32, "shared", False, 4, 1),
    (2, 37, 2, 64, "shared", True, 8, 4), (1, 50, 1, 64, "batch", False, 4, 4), (1, 1, 2, 64, "none", True, 8, 4),
])
def test_flat_transliteration_of_the_cuda_code_matches_autograd(B, T, H, N, state, final_grad, epp, ncb,
                                                                 one_thread):
    """The .cu code's own index arithmetic (staging, buffers, shared-memory slots, checkpoint layout, lanes),
    transliterated onto flat arrays that start as NaN: any unstaged read or unwritten output would show. ncb = 4:
    the parameter kernel with each head's columns split over four blocks (GPUs with 99 KiB per block)."""
    x = make_inputs(B, T, H, N, seed=T)
    s0 = make_state(state, B, H, N, seed=3)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if final_grad else None
    leaves = [t.clone().requires_grad_() for t in x]
    s0_leaf = None if s0 is None else s0.clone().requires_grad_()
    o, sT = wkv7_recurrent(*leaves, initial_state=s0_leaf)
    ((o * dy).sum() + ((sT * dsT).sum() if dsT is not None else 0.0)).backward()
    y, sT_flat, grads = flat.forward_backward(*x, s0, dy, dsT, epp=epp, ncb=ncb)
    assert rel(y, o) < 1e-12 and rel(sT_flat, sT) < 1e-12
    refs = [t.grad for t in leaves] + [None if s0_leaf is None else s0_leaf.grad]
    for name, got, ref in zip("r w k v a b s0".split(), grads, refs):
        if ref is None:
            assert got is None, name
            continue
        assert torch.isfinite(got).all() and rel(got, ref) < 1e-10, name


# ============================================================================ CPU: availability and the build


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_nothing_is_built_and_torch_is_chosen(monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("is_available() must not build without CUDA")

    monkeypatch.setattr(_cuda_build, "load_kernel_library", no_build)
    monkeypatch.delenv("RWKV_PEFT_KERNEL", raising=False)
    ok, reason = wkv7_cuda.is_available()
    assert ok is False and reason
    name, why = select_backend(torch.device("cuda"))
    assert name == "torch" and why.startswith(reason)  # then why fla is not used either
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="RWKV_PEFT_KERNEL=cuda"):
        select_backend(torch.device("cuda"))
    assert "WKV-7 path: torch" in wkv7_cuda.describe()


def test_build_cache_key_lock_and_errors(tmp_path, monkeypatch):
    """Build directories are keyed by sources and arch under the env-selected root; one build at a time; a stale
    torch baton is cleared; a failed build raises with the compiler output written to build.log."""
    import torch.utils.cpp_extension as cpp_ext

    src = tmp_path / "src" / "k.cu"
    src.parent.mkdir()
    src.write_text("// v1\n")
    monkeypatch.setenv(_cuda_build.CACHE_ENV, str(tmp_path / "cache"))
    active, peak, calls = [0], [0], []
    guard = threading.Lock()

    def fake_load(name, sources, build_directory, **kw):
        assert not (tmp_path / build_directory / "lock").exists()   # the stale baton was removed
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        calls.append((name, build_directory, kw["extra_cuda_cflags"]))
        with guard:
            active[0] -= 1
        return build_directory

    monkeypatch.setattr(cpp_ext, "load", fake_load)
    d90 = _cuda_build.load_kernel_library("demo", [src], arch="90")
    assert d90.parent == tmp_path / "cache" and d90.name.startswith("demo-")
    assert "-gencode=arch=compute_90,code=sm_90" in calls[-1][2]
    assert (d90 / "build.log").read_text().startswith("build of demo ok")
    assert _cuda_build.load_kernel_library("demo", [src], arch="80") != d90
    (d90 / "lock").write_text("")                     # as if a build had been killed
    assert _cuda_build.load_kernel_library("demo", [src], arch="90") == d90
    src.write_text("// v2\n")
    assert _cuda_build.load_kernel_library("demo", [src], arch="90") != d90

    threads = [threading.Thread(target=_cuda_build.load_kernel_library, args=("demo", [src]),
                                kwargs={"arch": "90"}) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1

    def failing_load(**kw):
        raise RuntimeError("Error building extension 'demo':\nk.cu(3): error: expected a ';'")

    monkeypatch.setattr(cpp_ext, "load", lambda name, sources, **kw: failing_load(**kw))
    src.write_text("// v3\n")
    with pytest.raises(_cuda_build.KernelBuildError, match="expected a ';'") as info:
        _cuda_build.load_kernel_library("demo", [src], arch="90", cache_dir=tmp_path / "other")
    assert info.value.log_path.parent.parent == tmp_path / "other"
    assert "expected a ';'" in info.value.log_path.read_text()


# ============================================================================ GPU: the kernel itself


@pytest.fixture(scope="module")
def kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = wkv7_cuda._static_reason()
    if why is not None:  # the path does not apply here (a GPU before sm_80, no nvcc): the dispatch runs another
        pytest.skip(f"the CUDA kernel does not apply: {why}")
    ok, why = wkv7_cuda.is_available()
    if not ok:  # it applies: it must build and run
        pytest.fail(f"the CUDA kernel is not available on this GPU: {why}")
    return wkv7_cuda.wkv7_cuda


def run_case(fn, x, s0, dy, dsT):
    """Outputs and the gradients of every input (and s0) for loss = <o, dy> + <sT, dsT>."""
    leaves = [t.clone().requires_grad_() for t in x]
    s0_leaf = None if s0 is None else s0.clone().requires_grad_()
    o, sT = fn(*leaves, initial_state=s0_leaf)
    loss = (o.double() * dy).sum()
    if dsT is not None:
        loss = loss + (sT.double() * dsT).sum()
    loss.backward()
    grads = [t.grad for t in leaves] + [None if s0_leaf is None else s0_leaf.grad]
    return o.detach(), sT.detach(), grads


def compare(fn, B, T, H, N, dtype, state, final_grad, *, seed=0, decays="wide", oracle=None):
    dev = "cuda"
    x = make_inputs(B, T, H, N, dtype=dtype, device=dev, seed=seed, decays=decays)
    s0 = make_state(state, B, H, N, device=dev, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    # gradients representable in the input dtype, so the kernel and the oracle see the same numbers
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64).to(dtype).double().to(dev)
    dsT = torch.randn(B, H, N, N, generator=g, dtype=torch.float64).to(dev) if final_grad else None

    s0_k = None if s0 is None else s0.float()
    o, sT, grads = run_case(fn, x, s0_k, dy, dsT)
    if oracle is None:
        oracle = wkv7_recurrent if T <= 1000 else (lambda *a, **k: wkv7_chunked(*a, chunk_size=16, **k))
    s0_ref = None if s0 is None else s0_k.double()     # the fp32 state the kernel got, exactly
    o_ref, sT_ref, grads_ref = run_case(oracle, [t.double() for t in x], s0_ref, dy, dsT)

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert o.dtype == dtype and sT.dtype == torch.float32 and sT.shape == (B, H, N, N)
    errors = {"o": rel(o, o_ref), "sT": rel(sT, sT_ref)}
    for name, got, ref in zip("r w k v a b s0".split(), grads, grads_ref):
        if ref is None:
            assert got is None, name
            continue
        assert got.shape == ref.shape and torch.isfinite(got).all(), name
        errors["d" + name] = rel(got, ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


CONFIGS = [  # (B, H, initial state, gradient on the final state)
    (1, 1, "none", False),
    (3, 4, "batch", True),
    (3, 32, "shared", True),
    (1, 32, "batch", False),
    (3, 1, "shared", False),
]
CASES = [(T, cfg) for T in (1, 15, 16, 17, 1000, 4096) for cfg in CONFIGS
         if not (T == 4096 and cfg[0] * cfg[1] > 32)]   # keep the float64 oracle's memory in bounds


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,cfg", CASES, ids=[f"T{T}-B{c[0]}-H{c[1]}-{c[2]}-{'dsT' if c[3] else 'nodsT'}"
                                              for T, c in CASES])
def test_kernel_matches_reference(kernel, T, cfg, dtype):
    B, H, state, final_grad = cfg
    compare(kernel, B, T, H, 64, dtype, state, final_grad, seed=T + H)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_model_decay_range(kernel, dtype):
    compare(kernel, 3, 1000, 4, 64, dtype, "batch", True, seed=5, decays="model")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_cases_for_sanitizer(kernel, dtype):
    """Small enough for compute-sanitizer (select with -k small)."""
    compare(kernel, 2, 37, 2, 64, dtype, "batch", True, seed=3)
    compare(kernel, 1, 5, 1, 64, dtype, "shared", False, seed=4)
    compare(kernel, 1, 19, 2, 32, dtype, "none", True, seed=6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,cfg", [(37, (2, 2, "batch", True)), (1000, (3, 4, "shared", True)),
                                   (4096, (1, 32, "none", False))], ids=["small-split", "T1000", "T4096"])
def test_column_split_of_the_parameter_kernel(kernel, monkeypatch, T, cfg, dtype):
    """The parameter kernel with each head's columns over four blocks (what 99 KiB GPUs run), forced on any GPU,
    against the reference; and the same inputs unsplit give the same gradients."""
    B, H, state, final_grad = cfg
    monkeypatch.setattr(wkv7_cuda, "PARAM_SPLIT", 4)
    split = compare(kernel, B, T, H, 64, dtype, state, final_grad, seed=T + 7)
    monkeypatch.setattr(wkv7_cuda, "PARAM_SPLIT", 1)
    whole = compare(kernel, B, T, H, 64, dtype, state, final_grad, seed=T + 7)
    assert split == whole  # the same arithmetic, element by element, in either layout


@pytest.mark.cuda
def test_head_size_32(kernel):
    compare(kernel, 3, 100, 4, 32, torch.float32, "shared", True, seed=8)


@pytest.mark.cuda
def test_chunks_chained_through_the_state_equal_one_pass(kernel):
    """Long-context training: run a sequence as two chunks with the state carried; values and gradients equal
    one pass (the final-state gradient of chunk 1 arrives from chunk 2)."""
    B, T, H, N, cut = 2, 100, 4, 64, 37
    x = make_inputs(B, T, H, N, dtype=torch.float32, device="cuda", seed=11)
    s0 = make_state("shared", B, H, N, device="cuda", seed=12).float()
    dy = torch.randn(B, T, H, N, device="cuda", dtype=torch.float64)

    def one(*args, initial_state):
        return kernel(*args, initial_state=initial_state)

    def two(*args, initial_state):
        o1, s1 = kernel(*(t[:, :cut] for t in args), initial_state=initial_state)
        o2, s2 = kernel(*(t[:, cut:] for t in args), initial_state=s1)
        return torch.cat([o1, o2], 1), s2

    o_a, s_a, g_a = run_case(one, x, s0, dy, None)
    o_b, s_b, g_b = run_case(two, x, s0, dy, None)
    assert rel(o_b, o_a) < 1e-5 and rel(s_b, s_a) < 1e-5
    for name, ga, gb in zip("r w k v a b s0".split(), g_a, g_b):
        assert rel(gb, ga) < 1e-4, name


@pytest.mark.cuda
def test_long_sequence_stays_finite(kernel):
    x = make_inputs(1, 16384, 2, 64, dtype=torch.bfloat16, device="cuda", seed=13)
    leaves = [t.clone().requires_grad_() for t in x]
    s0 = torch.zeros(1, 2, 64, 64, device="cuda", requires_grad=True)
    o, sT = kernel(*leaves, initial_state=s0)
    (o.float().square().mean() + sT.square().mean()).backward()
    for t in [o, sT, s0.grad] + [t.grad for t in leaves]:
        assert torch.isfinite(t.float()).all()


@pytest.mark.cuda
def test_no_grad_forward_equals_training_forward(kernel):
    x = make_inputs(2, 50, 4, 64, dtype=torch.bfloat16, device="cuda", seed=14)
    s0 = make_state("batch", 2, 4, 64, device="cuda").float()
    with torch.no_grad():
        o1, s1 = kernel(*x, initial_state=s0)
    o2, s2 = kernel(*[t.clone().requires_grad_() for t in x], initial_state=s0)
    assert torch.equal(o1, o2.detach()) and torch.equal(s1, s2.detach())


@pytest.mark.cuda
def test_non_contiguous_and_mixed_inputs(kernel):
    B, T, H, N = 2, 40, 3, 64
    base = make_inputs(B, T + 1, H, N, dtype=torch.float32, device="cuda", seed=15)
    x = [t[:, 1:] for t in base]                     # non-contiguous views
    x[1] = x[1].double()                             # a mixed dtype: computed in fp32, output in r's dtype
    o, sT = kernel(*x)
    o_ref, sT_ref = wkv7_recurrent(*[t.double() for t in x])
    assert o.dtype == torch.float32 and rel(o, o_ref) < 1e-4 and rel(sT, sT_ref) < 1e-4


@pytest.mark.cuda
def test_dispatch_uses_the_kernel_on_cuda(kernel, monkeypatch):
    monkeypatch.delenv("RWKV_PEFT_KERNEL", raising=False)
    assert select_backend(torch.device("cuda"))[0] == "cuda"
    x = make_inputs(1, 20, 2, 64, dtype=torch.float32, device="cuda", seed=16)
    o, _ = wkv7(*x)
    assert rel(o, wkv7_recurrent(*[t.double() for t in x])[0]) < 1e-4
    monkeypatch.setenv("RWKV_PEFT_KERNEL", "torch")
    assert select_backend(torch.device("cuda"))[0] == "torch"
