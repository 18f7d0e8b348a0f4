"""RWKV-7 against the official ``rwkv`` package (v7, cpu fp32) on tiny random checkpoints."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_peft  # noqa: F401  (registers the Auto classes)
from rwkv_peft.convert import convert
from tests.factories import make_blinkdl_v7, official_reference, rel_err

TOL = 1e-5
SIZES = [  # vocab, width, layers
    (97, 128, 2),
    (300, 256, 3),
    (65536, 64, 1),
]


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"V{s[0]}-C{s[1]}-L{s[2]}")
def case(request, tmp_path_factory):
    vocab, width, layers = request.param
    d = tmp_path_factory.mktemp(f"v7_{vocab}_{width}_{layers}")
    pth = d / "model.pth"
    torch.save(make_blinkdl_v7(vocab, width, layers, seed=vocab + width), pth)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 17, 40)]
    ref = official_reference(pth, {"full": seqs, "steps": [seqs[1]], "greedy": [[seqs[1], 8]]}, d / "ref.pt")
    convert(pth, d / "hf", )
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    return model, seqs, ref


def test_one_pass_logits(case):
    model, seqs, ref = case
    with torch.no_grad():
        for toks, want in zip(seqs, ref["full"]):
            got = model(torch.tensor([toks])).logits[0]
            assert rel_err(got, want.view(len(toks), -1)) <= TOL


def test_token_by_token(case):
    model, seqs, ref = case
    toks, state, outs = seqs[1], None, []
    with torch.no_grad():
        for t in toks:
            out = model(torch.tensor([[t]]), state=state, use_cache=True)
            state = out.state
            outs.append(out.logits[0, -1])
    assert rel_err(torch.stack(outs), ref["steps"][0]) <= TOL


@pytest.mark.parametrize("cuts", [(5, 12), (1, 16, 17), (39,)])
def test_chunks_carry_state(case, cuts):
    model, seqs, ref = case
    toks = seqs[2]
    state, outs, start = None, [], 0
    with torch.no_grad():
        for end in list(cuts) + [len(toks)]:
            out = model(torch.tensor([toks[start:end]]), state=state, use_cache=True)
            outs.append(out.logits[0])
            state, start = out.state, end
    assert rel_err(torch.cat(outs), ref["full"][2]) <= TOL


def test_final_state_matches_official_layout(case):
    model, seqs, ref = case
    with torch.no_grad():
        state = model(torch.tensor([seqs[2]]), use_cache=True).state
    official = ref["full_state"][2]
    for i, (att_x, wkv, ffn_x) in enumerate(state):
        # official v7 state per layer: [att_x, S (H, N, N) as S[h, value, key], ffn_x]
        assert rel_err(att_x[0], official[3 * i]) <= TOL
        assert rel_err(wkv[0], official[3 * i + 1]) <= TOL
        assert rel_err(ffn_x[0], official[3 * i + 2]) <= TOL


def test_greedy_generate_matches_official(case):
    model, seqs, ref = case
    prompt = torch.tensor([seqs[1]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert out[0, prompt.shape[1]:].tolist() == ref["greedy"][0]
