"""Every version in ``rwkv_peft.versions.VERSIONS`` against the official ``rwkv`` package (cpu fp32) on tiny random
checkpoints, written once and parametrized over the versions (ids: the version's name): one-pass logits, token by
token, chunks carrying the state, the final state in the official layout, greedy generation, the HF folder through
the Auto classes, and the .pth -> HF folder -> .pth round trip. What differs between versions is one row of SPECS;
each version's own checks (conversion refusals, padding, LoRA, state tuning, ...) stay in test_rwkvN_parity.py."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_peft  # noqa: F401  (registers every version with the Auto classes)
from rwkv_peft.convert import convert
from rwkv_peft.versions import VERSIONS
from tests.factories import make_blinkdl_v7, official_reference, rel_err
from tests.factories_v4 import make_blinkdl_v4
from tests.factories_v5 import make_blinkdl_v5
from tests.factories_v6 import make_blinkdl_v6


def _layer_state(layer) -> List[torch.Tensor]:
    """Our (att_x, wkv [B, H, N, N], ffn_x) -> the official package's [att_x, S, ffn_x] (v5/v6: S[h, key, value],
    v7: S[h, value, key]; our state keeps each version's official layout)."""
    att_x, wkv, ffn_x = layer
    return [att_x[0], wkv[0], ffn_x[0]]


def _layer_state_v4(layer) -> List[torch.Tensor]:
    """Our (att_x, stack(aa, bb, pp) [B, 3, A], ffn_x) -> the official v4 [att_x, aa, bb, pp, ffn_x]."""
    att_x, wkv, ffn_x = layer
    assert wkv.dim() == 3 and wkv.shape[:2] == (1, 3)
    return [att_x[0], wkv[0, 0], wkv[0, 1], wkv[0, 2], ffn_x[0]]


@dataclass(frozen=True)
class Spec:
    make: Callable[..., dict]                # make_blinkdl_vN(vocab, width, layers, dtype=, seed=, **extra)
    sizes: Tuple[Tuple[int, int, int, dict], ...]  # parity cases: vocab, width, layers, extra factory arguments
    layer_state: Callable                    # one layer of our state -> the official state list's entries
    round_trip: Tuple[Tuple[int, dict, dict], ...]  # .pth round trips: width, extra factory args, config expected
    tol: float = 1e-5


SPECS: Dict[str, Spec] = {
    "rwkv7": Spec(make_blinkdl_v7,
                  ((97, 128, 2, {}), (300, 256, 3, {}), (65536, 64, 1, {})),
                  _layer_state,
                  ((128, {}, {"head_size": 64, "use_initial_state": False}),
                   (128, {"time_state": True}, {"head_size": 64, "use_initial_state": True}))),
    "rwkv6": Spec(make_blinkdl_v6,
                  ((97, 128, 2, {}), (300, 256, 3, {}), (97, 128, 2, {"time_state": True})),
                  _layer_state,
                  ((128, {}, {"head_size": 64, "intermediate_size": 448, "mix_low_rank": 32, "decay_low_rank": 64,
                              "use_initial_state": False}),
                   (128, {"time_state": True}, {"use_initial_state": True}))),
    "rwkv5": Spec(make_blinkdl_v5,
                  ((97, 128, 2, {}), (300, 256, 3, {}), (97, 128, 2, {"time_state": True})),
                  _layer_state,
                  ((128, {}, {"head_size": 64, "intermediate_size": 448, "use_initial_state": False}),
                   (128, {"time_state": True}, {"use_initial_state": True}))),
    # the package runs only attention width A = C (its att_seq writes the wkv into the [T, C] token-shift buffer);
    # A != C is checked for self-consistency in test_rwkv4_parity.py
    "rwkv4": Spec(make_blinkdl_v4,
                  ((97, 64, 2, {}), (300, 128, 3, {}), (61, 64, 4, {})),
                  _layer_state_v4,
                  ((64, {}, {"attention_hidden_size": 64, "intermediate_size": 256}),
                   (64, {"att_width": 96}, {"attention_hidden_size": 96, "intermediate_size": 256}))),
}
assert set(SPECS) == {v.name for v in VERSIONS}, "a version without a row in SPECS"


def _extra_id(extra: dict) -> str:
    return "".join(f"-{k}{'' if v is True else v}" for k, v in extra.items())


CASES = [pytest.param((v, size), id=f"{v.name}-V{size[0]}-C{size[1]}-L{size[2]}{_extra_id(size[3])}")
         for v in VERSIONS for size in SPECS[v.name].sizes]
ROUND_TRIPS = [pytest.param(v, width, extra, want, dtype,
                            id=f"{v.name}-C{width}{_extra_id(extra)}-{str(dtype).split('.')[-1]}")
               for v in VERSIONS for width, extra, want in SPECS[v.name].round_trip
               for dtype in (torch.float32, torch.bfloat16)]


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    """(version, model read from our HF folder through the Auto classes, token lists, the official results)."""
    version, (vocab, width, layers, extra) = request.param
    d = tmp_path_factory.mktemp(f"{version.name}_{vocab}_{width}_{layers}")
    pth = d / "model.pth"
    torch.save(SPECS[version.name].make(vocab, width, layers, seed=vocab + width, **extra), pth)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 17, 40)]
    ref = official_reference(pth, {"full": seqs, "steps": [seqs[1]], "greedy": [[seqs[1], 8]]}, d / "ref.pt",
                             version=version.blinkdl)
    convert(pth, d / "hf")
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    assert type(model) is version.causal_lm_class
    if "time_state" in extra:
        assert model.config.use_initial_state == extra["time_state"]
    if "att_width" in extra:
        assert model.config.attention_hidden_size == (extra["att_width"] or width)
    return version, model, seqs, ref


def test_one_pass_logits(case):
    version, model, seqs, ref = case
    with torch.no_grad():
        for toks, want in zip(seqs, ref["full"]):
            got = model(torch.tensor([toks])).logits[0]
            assert rel_err(got, want.view(len(toks), -1)) <= SPECS[version.name].tol


def test_token_by_token(case):
    version, model, seqs, ref = case
    toks, state, outs = seqs[1], None, []
    with torch.no_grad():
        for t in toks:
            out = model(torch.tensor([[t]]), state=state, use_cache=True)
            state = out.state
            outs.append(out.logits[0, -1])
    assert rel_err(torch.stack(outs), ref["steps"][0]) <= SPECS[version.name].tol


@pytest.mark.parametrize("cuts", [(5, 12), (1, 16, 17), (39,)])
def test_chunks_carry_state(case, cuts):
    version, model, seqs, ref = case
    toks = seqs[2]
    state, outs, start = None, [], 0
    with torch.no_grad():
        for end in list(cuts) + [len(toks)]:
            out = model(torch.tensor([toks[start:end]]), state=state, use_cache=True)
            outs.append(out.logits[0])
            state, start = out.state, end
    assert rel_err(torch.cat(outs), ref["full"][2]) <= SPECS[version.name].tol


def test_final_state_matches_official_layout(case):
    version, model, seqs, ref = case
    spec = SPECS[version.name]
    with torch.no_grad():
        state = model(torch.tensor([seqs[2]]), use_cache=True).state
    ours = [t for layer in state for t in spec.layer_state(layer)]
    official = ref["full_state"][2]
    assert len(ours) == len(official)
    for i, (got, want) in enumerate(zip(ours, official)):
        assert got.dtype == torch.float32 and got.shape == want.shape, i
        assert rel_err(got, want) <= spec.tol, i


def test_greedy_generate_matches_official(case):
    _, model, seqs, ref = case
    prompt = torch.tensor([seqs[1]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert out[0, prompt.shape[1]:].tolist() == ref["greedy"][0]


def test_init_state_is_the_starting_state(case):
    _, model, seqs, _ = case
    x = torch.tensor([seqs[1]])
    with torch.no_grad():
        a = model(x).logits
        b = model(x, state=model.init_state(1), use_cache=True).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("version, width, extra, want, dtype", ROUND_TRIPS)
def test_pth_round_trip_is_bit_identical(tmp_path, version, width, extra, want, dtype):
    """.pth -> our HF folder (save_pretrained) -> .pth gives the same keys, in the official order, and bytes."""
    from safetensors.torch import load_file
    sd = SPECS[version.name].make(97, width, 2, dtype=dtype, seed=7, **extra)
    config, hf = version.blinkdl_to_hf(sd, where="rt.pth")
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (97, width, 2)
    assert {k: getattr(config, k) for k in want} == want
    with torch.device("meta"):
        model = version.causal_lm_class(config)
    model.load_state_dict(hf, assign=True, strict=True)
    model.save_pretrained(tmp_path / "hf")
    back = version.hf_to_blinkdl(load_file(str(tmp_path / "hf" / "model.safetensors")), config)
    assert list(back) == list(sd)  # same keys in the official order
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k].contiguous().view(torch.uint8), t.view(torch.uint8)), k  # the same bytes
