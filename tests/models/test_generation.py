"""generate() reads each token once, whatever transformers version carries the steps (models/generation.py).

Each mode is held to two things: the model sees the prompt once and then one new token per row and step, and the
result equals generate(use_cache=False), which re-reads the whole text at every step (the slow, obviously
right way). CI runs this file on the newest and the oldest transformers that pyproject.toml admits.
"""
import io
from contextlib import redirect_stdout

import pytest
import torch
from transformers import GenerationMixin, TextStreamer
from transformers.generation.streamers import BaseStreamer

from rwkv_peft import RWKV6Config, RWKV6ForCausalLM, RWKV7Config, RWKV7ForCausalLM, RWKVWorldTokenizer
from rwkv_peft.models.generation import GenerationHookError

VOCAB = 120
VERSIONS = {"v7": (RWKV7Config, RWKV7ForCausalLM), "v6": (RWKV6Config, RWKV6ForCausalLM)}


@pytest.fixture(params=sorted(VERSIONS), scope="module")
def model(request):
    config_cls, model_cls = VERSIONS[request.param]
    torch.manual_seed(0)
    m = model_cls(config_cls(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2)).eval()
    with torch.no_grad():  # the default init zeroes some maps; make every path matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def prompt(B=1, T=8, seed=1):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


class Reads:
    """Counts the tokens each call of the model body reads: a list of (rows, tokens)."""

    def __init__(self, model):
        self.calls, self.model = [], model

    def __enter__(self):
        def hook(module, args, kwargs):
            x = kwargs.get("input_ids")
            x = kwargs["inputs_embeds"] if x is None else x
            self.calls.append(tuple(x.shape[:2]))
        self.handle = self.model.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generate_both(model, ids, seed=None, **kw):
    """(cached result, what it read, result of re-reading everything at every step)."""
    kw.setdefault("attention_mask", torch.ones_like(ids))
    kw.setdefault("pad_token_id", 0)
    with Reads(model) as reads:
        if seed is not None:
            torch.manual_seed(seed)
        fast = model.generate(ids, **kw)
    if seed is not None:
        torch.manual_seed(seed)
    slow = model.generate(ids, use_cache=False, **kw)
    return fast, reads.calls, slow


def test_greedy_reads_each_token_once(model):
    ids = prompt()
    out, calls, slow = generate_both(model, ids, max_new_tokens=5, do_sample=False)
    assert calls == [(1, 8), (1, 1), (1, 1), (1, 1), (1, 1)]
    assert torch.equal(out, slow) and out.shape == (1, 13)


def test_sampling_reads_once_and_is_reproducible(model):
    ids = prompt(B=2)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=1.5, num_return_sequences=2)
    out, calls, slow = generate_both(model, ids, seed=123, **kw)
    assert calls == [(4, 8)] + [(4, 1)] * 5
    assert torch.equal(out, slow)
    torch.manual_seed(123)
    assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw), out)


def test_batched_left_padding_reads_once_and_matches_each_prompt_alone(model):
    long, short = prompt(T=9, seed=2)[0], prompt(T=5, seed=3)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out, calls, slow = generate_both(model, batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert calls == [(2, 9)] + [(2, 1)] * 5
    assert torch.equal(out, slow)
    for row, p in enumerate((long, short)):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out[row, 9:].tolist() == alone[0, len(p):].tolist()


def test_beam_search_reorders_the_state(model):
    ids = prompt(B=2, T=6, seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=4, num_return_sequences=2, early_stopping=False)
    out, calls, slow = generate_both(model, ids, **kw)
    assert calls[0] == (8, 6) and set(calls[1:]) == {(8, 1)}
    assert torch.equal(out, slow)


def test_starting_state_continues_a_text(model):
    head, tail = prompt(T=7, seed=5), prompt(T=4, seed=6)
    with torch.no_grad():
        state = model(head, use_cache=True).state
    both = torch.cat([head, tail], 1)
    whole = model.generate(both, attention_mask=torch.ones_like(both), max_new_tokens=6, do_sample=False)
    with Reads(model) as reads:
        cont = model.generate(tail, attention_mask=torch.ones_like(tail), state=state, max_new_tokens=6,
                              do_sample=False)
    assert reads.calls == [(1, 4)] + [(1, 1)] * 5
    assert cont[0, 4:].tolist() == whole[0, 11:].tolist()


def test_prompt_as_embeddings(model):
    ids = prompt(T=6, seed=7)
    by_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                            do_sample=False)
    with Reads(model) as reads:
        by_emb = model.generate(inputs_embeds=model.get_input_embeddings()(ids).detach(),
                                attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                                do_sample=False)
    assert reads.calls == [(1, 6)] + [(1, 1)] * 4
    assert by_emb[0, -5:].tolist() == by_ids[0, 6:].tolist()


def test_scores_and_dict_output(model):
    ids = prompt()
    res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    assert res.sequences.shape == (1, 12) and len(res.scores) == 4
    assert res.scores[0].shape == (1, VOCAB)
    assert [int(s.argmax()) for s in res.scores] == res.sequences[0, 8:].tolist()


def test_streamers_get_every_token(model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    ids, collect = prompt(), Collect()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         streamer=collect)
    assert collect.chunks == [ids[0].tolist()] + [[t] for t in out[0, 8:].tolist()] + ["end"]

    tok, printed = RWKVWorldTokenizer(), io.StringIO()
    with redirect_stdout(printed):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             streamer=TextStreamer(tok, skip_prompt=True))
    assert printed.getvalue().rstrip("\n") == tok.decode(out[0, 8:]).rstrip("\n")


def test_a_peft_model_generates_the_same_way(model):
    from peft import LoraConfig, get_peft_model

    from rwkv_peft.quiet import peft_wrapping
    with peft_wrapping():  # peft reads transformers' deprecated is_gradient_checkpointing
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["key", "value"], init_lora_weights=False))
    try:
        ids = prompt()
        out, calls, slow = generate_both(lora, ids, max_new_tokens=5, do_sample=False)
        assert calls == [(1, 8)] + [(1, 1)] * 4
        assert torch.equal(out, slow)
    finally:
        lora.unload()


def test_a_generate_that_stops_handing_the_state_back_is_an_error(model, monkeypatch):
    """If transformers stops calling our hook, generation fails loudly instead of re-reading every step."""
    monkeypatch.setattr(model, "_update_model_kwargs_for_generation",
                        GenerationMixin._update_model_kwargs_for_generation.__get__(model))
    ids = prompt()
    with pytest.raises(GenerationHookError, match="did not hand the RNN state back"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)



def test_cpu_decoding_layout_keeps_logits_and_generation(model):
    """relayout_for_cpu_decoding (what chat / generate do on the CPU): every plain Linear weight [in, out] in memory,
    same values and modules; logits within float rounding, greedy generation identical, peft still wraps it."""
    import copy

    from peft import LoraConfig, get_peft_model

    from rwkv_peft.methods import relayout_for_cpu_decoding
    from rwkv_peft.quiet import peft_wrapping
    relaid = copy.deepcopy(model)
    linears = [m for m in relaid.modules() if type(m) is torch.nn.Linear]
    assert relayout_for_cpu_decoding(relaid) == len(linears) > 0
    assert all(not m.weight.is_contiguous() and m.weight.t().is_contiguous() for m in linears)
    assert relayout_for_cpu_decoding(relaid) == 0  # once is enough
    ids = prompt(2, 9)
    with torch.no_grad():
        assert torch.allclose(relaid(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(relaid.generate(ids, **kw), model.generate(ids, **kw))
    with peft_wrapping():
        lora = get_peft_model(relaid, LoraConfig(r=4, target_modules=["key", "value"], init_lora_weights=False))
    assert lora.generate(ids, **kw).shape == (2, 15)
