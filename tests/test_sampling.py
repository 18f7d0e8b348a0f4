"""RWKV-style sampling (rwkv_peft/sampling.py): the presence / frequency penalties with decay as a transformers
LogitsProcessor, checked on hand-computed cases and against the official package's loop, and the processor order."""
import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rwkv_peft.sampling import (RWKVPenaltyLogitsProcessor, logits_processors, next_token,
                                uncounted_token_ids)


def official_penalties(generated, vocab, presence, frequency, decay, uncounted=()):
    """The official ``rwkv.utils.PIPELINE.generate`` bookkeeping, as it is written there (a dict of counts)."""
    occurrence = {}
    for token in generated:
        for t in occurrence:
            occurrence[t] *= decay
        www = 0 if token in uncounted else 1
        occurrence[token] = occurrence.get(token, 0) + www
    out = torch.zeros(vocab)
    for t, c in occurrence.items():
        out[t] -= presence + c * frequency
    return out


def test_hand_computed_penalties_count_only_generated_tokens():
    # prompt [4, 4] then generated 1, 2, 1; decay 0.5: token 1 counts 0.25 + 1 = 1.25, token 2 counts 0.5
    proc = RWKVPenaltyLogitsProcessor(presence=0.5, frequency=1.0, decay=0.5, prompt_length=2)
    scores = proc(torch.tensor([[4, 4, 1, 2, 1]]), torch.zeros(1, 5))
    assert scores.tolist() == [[0.0, -1.75, -1.0, 0.0, 0.0]]
    # no decay: plain counts (token 1 twice, token 2 once)
    proc = RWKVPenaltyLogitsProcessor(presence=0.0, frequency=2.0, decay=1.0, prompt_length=2)
    assert proc(torch.tensor([[4, 4, 1, 2, 1]]), torch.ones(1, 5)).tolist() == [[1.0, -3.0, -1.0, 1.0, 1.0]]
    # nothing generated yet: unchanged
    assert torch.equal(proc(torch.tensor([[4, 4]]), torch.ones(1, 5)), torch.ones(1, 5))


def test_uncounted_tokens_get_the_presence_penalty_only():
    proc = RWKVPenaltyLogitsProcessor(presence=0.25, frequency=1.0, decay=1.0, uncounted_ids=[3])
    scores = proc(torch.tensor([[3, 3, 2]]), torch.zeros(1, 4))
    assert scores.tolist() == [[0.0, 0.0, -1.25, -0.25]]


def test_rows_are_independent_and_padding_columns_are_the_prompt():
    # two rows of one left-padded batch: the prompt columns (padding 0 included) are not counted
    proc = RWKVPenaltyLogitsProcessor(presence=1.0, frequency=0.5, decay=0.9, prompt_length=3)
    ids = torch.tensor([[0, 0, 7, 1, 1], [5, 6, 7, 2, 1]])
    scores = proc(ids, torch.zeros(2, 8))
    assert scores[0].tolist() == pytest.approx([0, -(1 + 0.5 * 1.9), 0, 0, 0, 0, 0, 0])
    assert scores[1].tolist() == pytest.approx([0, -1.5, -(1 + 0.5 * 0.9), 0, 0, 0, 0, 0])


def test_matches_the_official_bookkeeping_on_random_sequences():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        vocab, n = 11, int(torch.randint(1, 30, (1,), generator=g))
        generated = torch.randint(0, vocab, (n,), generator=g).tolist()
        proc = RWKVPenaltyLogitsProcessor(presence=0.3, frequency=0.7, decay=0.996, uncounted_ids=[0, 5])
        got = proc(torch.tensor([generated]), torch.zeros(1, vocab))[0]
        want = official_penalties(generated, vocab, 0.3, 0.7, 0.996, uncounted=(0, 5))
        assert torch.allclose(got, want, atol=1e-5), (generated, got, want)


def test_processor_order_is_the_official_one():
    procs = logits_processors(temperature=0.5, top_p=0.6, top_k=2, presence_penalty=0.1)
    assert [type(p) for p in procs] == [RWKVPenaltyLogitsProcessor, TopPLogitsWarper, TopKLogitsWarper,
                                        TemperatureLogitsWarper]
    assert [type(p) for p in logits_processors(temperature=0, top_p=0.6, frequency_penalty=1)] == \
        [RWKVPenaltyLogitsProcessor]  # greedy: the penalties only
    assert len(logits_processors()) == 0
    # the nucleus is cut on the untempered probabilities [0.5, 0.3, 0.2]: top-p 0.6 keeps two tokens even at a
    # low temperature (which would leave token 0 alone above 0.6)
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    out = logits_processors(temperature=0.1, top_p=0.6)(torch.zeros(1, 0, dtype=torch.long), logits.clone())
    assert torch.isfinite(out[0, :2]).all() and out[0, 2] == -float("inf")
    assert torch.allclose(out[0, :2], logits[0, :2] / 0.1)
    with pytest.raises(ValueError, match="top_p"):
        logits_processors(top_p=1.5)


def test_next_token_greedy_with_penalties_moves_off_a_repeated_token():
    procs = logits_processors(temperature=0, frequency_penalty=1.0, penalty_decay=1.0)
    logits = torch.tensor([0.0, 2.5, 2.0])
    assert next_token(procs, [], logits, 0) == 1
    assert next_token(procs, [1], logits, 0) == 2  # 2.5 - 1 < 2.0
    assert next_token(procs, [1, 2], logits, 0) == 1  # 1.5 > 1.0
    g = torch.Generator().manual_seed(0)
    sampled = {next_token(logits_processors(temperature=1.0, top_k=1), [], logits, 1.0, g) for _ in range(5)}
    assert sampled == {1}


def test_uncounted_token_ids_of_the_world_tokenizer():
    from rwkv_peft.tokenization import RWKVWorldTokenizer
    tok = RWKVWorldTokenizer()
    ids = uncounted_token_ids(tok)
    texts = {tok.decode([i]) for i in ids}
    assert {" ", "\t", "0", "7"} <= texts
    assert all(t and t in " \t0123456789" for t in texts)
