"""Several LoRA adapters combined through ``rwkv_peft.merge.merge_adapters``, each combination type held to a
computation written here by hand from its definition (nothing of peft's ``merge_utils`` is called for the
expected values).

The case: two rank-4 LoRA adapters on ``att.key`` [128, 128] and ``ffn.value`` [128, 512] of a tiny RWKV-7,
with alpha 8 and 4 (scalings 2 and 1) and A, B set to known random values. What is compared: the merged weight
minus the base weight of each target (every other weight must be untouched).

Definitions (TIES: Yadav et al. 2023; DARE: Yu et al. 2023), as peft applies them to LoRA:
- trim / magnitude prune: keep the ``int(density * numel)`` entries of largest magnitude of each task tensor;
- elect: per entry, the sign of the SUM of the (trimmed, unweighted) task tensors (peft's default
  ``majority_sign_method="total"``; a zero sum counts as +);
- disjoint merge: per entry, the sum of the weighted entries whose sign is the elected one, divided by how many
  there are (entries no tensor agrees with give 0);
- DARE: drop each entry with probability ``1 - density`` (a Bernoulli(density) mask) and divide the survivors by
  ``density``; dare_linear then sums with the weights, dare_ties elects and merges as TIES does.
- "linear", "ties", "dare_*", "magnitude_prune": these act on the A factors and on the B factors separately, with
  factor weights ``sqrt(|w s|) * sign(w s)`` for A and ``sqrt(|w s|)`` for B (s = alpha / r); the delta is then
  ``B_m A_m`` (the combined adapter has scaling 1).
- "*_svd": the same on the delta weights ``s B A`` themselves, then the best rank-``max(r)`` approximation
  (truncated SVD), which is what merge.py asks peft for (svd_rank = the largest rank).
"""
import math

import pytest
import torch

from rwkv_peft.merge import MergeError, merge_adapters
from rwkv_peft.methods import apply_lora, load_base_model, save_adapter
from tests.factories import rel_err

TARGETS = "att.key,ffn.value"
R, ALPHAS = 4, (8, 4)  # scalings 2 and 1: each adapter's scaling must enter the combination
REAL_BERNOULLI = torch.bernoulli


def _known_adapter(base_pth, out, alpha, seed, variant="lora", r=R):
    """A LoRA adapter with A, B drawn from ``seed`` (both nonzero); returns {weight key: (A, B, scaling)}."""
    model = apply_lora(load_base_model(base_pth, dtype="float32"), r=r, alpha=alpha, targets=TARGETS,
                       variant=variant)
    g = torch.Generator().manual_seed(seed)
    known = {}
    for name, mod in model.named_modules():
        if "default" not in getattr(mod, "lora_A", {}):
            continue
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=g) * 0.2)
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        scaling = alpha / math.sqrt(r) if variant == "rslora" else alpha / r  # LoRA / rsLoRA, by definition
        known[name.split("base_model.model.", 1)[1] + ".weight"] = (a.detach().clone(), b.detach().clone(), scaling)
    save_adapter(model, out)
    return known


@pytest.fixture(scope="module")
def two(base_pth, tmp_path_factory):
    """(adapter folders, {weight key: [(A, B, s) of adapter 1, of adapter 2]}) in the model's module order."""
    d = tmp_path_factory.mktemp("known_adapters")
    k1 = _known_adapter(base_pth, d / "a1", ALPHAS[0], seed=1)
    k2 = _known_adapter(base_pth, d / "a2", ALPHAS[1], seed=2)
    assert list(k1) == ["model.blocks.0.att.key.weight", "model.blocks.0.ffn.value.weight",
                        "model.blocks.1.att.key.weight", "model.blocks.1.ffn.value.weight"]
    return [d / "a1", d / "a2"], {k: [k1[k], k2[k]] for k in k1}


@pytest.fixture(scope="module")
def base_sd(base_pth):
    return load_base_model(base_pth, dtype="float32").state_dict()


@pytest.fixture
def bernoulli_calls(monkeypatch):
    """Every ``torch.bernoulli`` call (DARE's masks): (RNG state before it, probabilities, mask)."""
    calls = []

    def spy(p, *args, **kwargs):
        state = torch.get_rng_state()
        out = REAL_BERNOULLI(p, *args, **kwargs)
        calls.append((state, p.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(torch, "bernoulli", spy)
    return calls


def deltas(merged, base_sd, keys):
    """merged - base for the target weights; every other tensor must be exactly the base's."""
    sd = merged.state_dict()
    assert set(sd) == set(base_sd)
    for k in base_sd:
        if k not in keys:
            assert torch.equal(sd[k], base_sd[k]), f"{k} changed but is no LoRA target"
    return {k: sd[k] - base_sd[k] for k in keys}


# ---- the definitions, by hand ----------------------------------------------------------------------------------------

def trim(x, density):
    """Keep the int(density * numel) entries of largest |x| (TIES' trim, magnitude pruning); zero the rest."""
    k = int(density * x.numel())
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.argsort(x.abs().flatten(), descending=True)[:k]] = True
    return torch.where(keep.view_as(x), x, torch.zeros_like(x))


def elect_and_mean(xs, ws):
    """TIES' elect (the sign of the summed values, + on a zero sum) and disjoint mean (of the weighted entries
    that carry the elected sign; zeros carry none)."""
    total = xs[0].clone()
    for x in xs[1:]:
        total = total + x
    elected = torch.where(total >= 0, 1.0, -1.0)
    num, count = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
    for x, w in zip(xs, ws):
        agree = torch.sign(x) == elected
        num = num + torch.where(agree, w * x, torch.zeros_like(x))
        count = count + agree.to(x.dtype)
    return num / torch.clamp(count, min=1.0)


def weighted_sum(xs, ws):
    out = torch.zeros_like(xs[0])
    for x, w in zip(xs, ws):
        out = out + w * x
    return out


def dare_drop(x, mask, density):
    """DARE: dropped entries (mask 0) go; the survivors are rescaled by 1 / density."""
    return x * mask / density


def combine_hand(kind, xs, ws, density, masks):
    if kind in ("linear", "svd"):
        return weighted_sum(xs, ws)
    if kind.startswith("magnitude_prune"):
        return weighted_sum([trim(x, density) for x in xs], ws)
    if kind.startswith("ties"):
        return elect_and_mean([trim(x, density) for x in xs], ws)
    if density >= 1:  # no dropping at density 1
        masks = [torch.ones_like(x) for x in xs]
    dropped = [dare_drop(x, m, density) for x, m in zip(xs, masks)]
    if kind.startswith("dare_linear"):
        return weighted_sum(dropped, ws)
    assert kind.startswith("dare_ties")
    return elect_and_mean(dropped, ws)


def factor_weights(w, s):
    c = w * s
    return math.copysign(math.sqrt(abs(c)), c), math.sqrt(abs(c))


def best_rank(x, r):
    """The best rank-r approximation (Eckart-Young), in float64."""
    u, sv, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return ((u[:, :r] * sv[:r]) @ vh[:r]).float()


def expected_deltas(kind, known, weights, density, masks=None):
    """{weight key: expected merged delta}; ``masks`` lists DARE's masks in the order they are drawn: per target
    module (model order), the A factors then the B factors (factor types) or the deltas (svd types)."""
    masks = list(masks or [])
    out = {}
    for key, per in known.items():
        if kind.endswith("svd"):
            ds = [s * (b @ a) for a, b, s in per]
            ms = [masks.pop(0) for _ in ds] if kind.startswith("dare") and density < 1 else None
            out[key] = best_rank(combine_hand(kind, ds, list(weights), density, ms), max(a.shape[0] for a, _, _ in per))
        else:
            fw = [factor_weights(w, s) for w, (_, _, s) in zip(weights, per)]
            dare = kind.startswith("dare") and density < 1
            ma = [masks.pop(0) for _ in per] if dare else None
            mb = [masks.pop(0) for _ in per] if dare else None
            a_m = combine_hand(kind, [a for a, _, _ in per], [f[0] for f in fw], density, ma)
            b_m = combine_hand(kind, [b for _, b, _ in per], [f[1] for f in fw], density, mb)
            out[key] = b_m @ a_m
    assert not masks, "more masks drawn than the definition uses"
    return out


def exact_sum(known, weights):
    """sum_i w_i s_i B_i A_i: what "cat" gives, and what the other types differ from."""
    return {k: weighted_sum([s * (b @ a) for a, b, s in per], list(weights)) for k, per in known.items()}


def mask_shapes(kind, known):
    shapes = []
    for per in known.values():
        if kind.endswith("svd"):
            shapes += [(b.shape[0], a.shape[1]) for a, b, _ in per]
        else:
            shapes += [tuple(a.shape) for a, _, _ in per] + [tuple(b.shape) for _, b, _ in per]
    return shapes


# ---- the tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,weights,density,tol", [
    ("cat", (0.7, 0.3), None, 1e-5),
    ("linear", (0.7, 0.3), None, 1e-5),
    ("linear", (0.8, -0.5), None, 1e-5),  # a negative weight: its sign goes on the A factor only
    ("magnitude_prune", (0.7, 0.3), 0.3, 1e-5),
    ("ties", (0.7, 0.3), 0.3, 1e-5),
    ("ties", (0.8, -0.5), 0.6, 1e-5),
    ("ties", (1.0, 1.0), 1.0, 1e-5),  # no trimming: still the sign election and disjoint mean
    ("svd", (0.7, 0.3), None, 1e-4),
    ("ties_svd", (0.7, 0.3), 0.3, 1e-4),
    ("magnitude_prune_svd", (0.6, 0.4), 0.5, 1e-4),
])
def test_deterministic_combinations_match_the_definitions(kind, weights, density, tol, two, base_pth, base_sd):
    dirs, known = two
    merged = merge_adapters(base_pth, dirs, weights=list(weights), combine=kind, density=density)
    got = deltas(merged, base_sd, known)
    want = exact_sum(known, weights) if kind == "cat" else expected_deltas(kind, known, weights, density)
    for k in known:
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))
    if kind != "cat":  # the hand value really is another thing than the plain weighted sum of the deltas
        assert max(rel_err(want[k], exact_sum(known, weights)[k]) for k in known) > 0.05


def test_density_defaults_to_one_half(two, base_pth, base_sd):
    dirs, known = two
    got = deltas(merge_adapters(base_pth, dirs, weights=[0.7, 0.3], combine="ties"), base_sd, known)
    want = expected_deltas("ties", known, (0.7, 0.3), 0.5)
    for k in known:
        assert rel_err(got[k], want[k]) <= 1e-5


def test_default_weights_are_one_over_n(two, base_pth, base_sd):
    dirs, known = two
    got = deltas(merge_adapters(base_pth, dirs, combine="ties", density=0.4), base_sd, known)
    want = expected_deltas("ties", known, (0.5, 0.5), 0.4)
    for k in known:
        assert rel_err(got[k], want[k]) <= 1e-5


@pytest.mark.parametrize("kind,weights,density", [
    ("dare_linear", (0.7, 0.3), 0.4),
    ("dare_ties", (0.7, 0.3), 0.4),
    ("dare_ties", (0.8, -0.5), 0.7),
    ("dare_linear_svd", (0.7, 0.3), 0.5),
    ("dare_ties_svd", (0.7, 0.3), 0.5),
])
def test_dare_matches_the_definition_with_its_masks(kind, weights, density, two, base_pth, base_sd,
                                                    bernoulli_calls):
    dirs, known = two
    merged = merge_adapters(base_pth, dirs, weights=list(weights), combine=kind, density=density, seed=3)
    got = deltas(merged, base_sd, known)
    shapes = mask_shapes(kind, known)
    assert [tuple(p.shape) for _, p, _ in bernoulli_calls] == shapes
    for _, p, m in bernoulli_calls:  # Bernoulli(density) masks of 0/1
        assert torch.all(p == density) and set(m.unique().tolist()) <= {0.0, 1.0}
    kept = sum(float(m.sum()) for _, _, m in bernoulli_calls) / sum(m.numel() for _, _, m in bernoulli_calls)
    assert abs(kept - density) < 0.03, kept
    # the masks again, drawn here one after another from the generator state at the first draw: the same masks,
    # so nothing else draws in between and they come in the order expected_deltas uses them
    with torch.random.fork_rng():
        torch.set_rng_state(bernoulli_calls[0][0])
        masks = [REAL_BERNOULLI(torch.full(s, density)) for s in shapes]
    assert all(torch.equal(m, c[2]) for m, c in zip(masks, bernoulli_calls))
    want = expected_deltas(kind, known, weights, density, masks)
    tol = 1e-4 if kind.endswith("svd") else 1e-5
    for k in known:
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))


def test_dare_seed_decides_the_masks(two, base_pth):
    dirs, _ = two
    run = [merge_adapters(base_pth, dirs, weights=[0.7, 0.3], combine="dare_ties", density=0.5, seed=s).state_dict()
           for s in (3, 3, 4)]
    keys = [k for k in run[0] if k.endswith("att.key.weight")]
    assert all(torch.equal(run[0][k], run[1][k]) for k in run[0])  # the same seed: the same merge
    assert not any(torch.equal(run[0][k], run[2][k]) for k in keys)  # another seed: other masks


@pytest.mark.parametrize("dare,plain", [("dare_linear", "linear"), ("dare_ties", "ties")])
def test_dare_at_density_one_drops_nothing(dare, plain, two, base_pth, bernoulli_calls):
    dirs, _ = two
    a = merge_adapters(base_pth, dirs, weights=[0.7, 0.3], combine=dare, density=1.0).state_dict()
    assert not bernoulli_calls
    b = merge_adapters(base_pth, dirs, weights=[0.7, 0.3], combine=plain, density=1.0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rslora_adapters_combine_with_their_own_scaling(base_pth, base_sd, tmp_path):
    """peft keeps use_rslora on the combined adapter (scaling r/sqrt(r) instead of 1); merge.py undoes it."""
    k1 = _known_adapter(base_pth, tmp_path / "r1", 8, seed=1, variant="rslora")
    k2 = _known_adapter(base_pth, tmp_path / "r2", 4, seed=2, variant="rslora")
    known = {k: [k1[k], k2[k]] for k in k1}
    for kind, density in (("cat", None), ("linear", None), ("ties", 0.5), ("svd", None)):
        merged = merge_adapters(base_pth, [tmp_path / "r1", tmp_path / "r2"], weights=[0.7, 0.3], combine=kind,
                                density=density)
        got = deltas(merged, base_sd, known)
        want = exact_sum(known, (0.7, 0.3)) if kind == "cat" else expected_deltas(kind, known, (0.7, 0.3), density)
        for k in known:
            assert rel_err(got[k], want[k]) <= (1e-4 if kind == "svd" else 1e-5), (kind, k)


def test_dora_adapters_are_not_combined(base_pth, tmp_path):
    for i in (1, 2):
        _known_adapter(base_pth, tmp_path / f"d{i}", 8, seed=i, variant="dora")
    with pytest.raises(MergeError, match="DoRA adapters cannot be combined"):
        merge_adapters(base_pth, [tmp_path / "d1", tmp_path / "d2"], weights=[0.5, 0.5], combine="cat")
    merge_adapters(base_pth, [tmp_path / "d1"])  # on its own, with weight 1: merged as it is


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range_is_refused(density, two, base_pth):
    with pytest.raises(MergeError, match=r"density .*\(0, 1\]"):
        merge_adapters(base_pth, two[0], combine="dare_linear", density=density)
