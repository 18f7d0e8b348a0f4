"""The DeepEmbed RWKV-7 variant against the official package run with RWKV_DE_VERSION=1 (cpu fp32): one pass,
token by token, in chunks, the final state and greedy generation; lossless conversion; LoRA, state tuning and
merges on it."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_peft  # noqa: F401  (registers the Auto classes)
from rwkv_peft.convert import convert, load_any, to_blinkdl
from tests.factories import make_blinkdl_v7, official_reference, rel_err

TOL = 1e-5
R = 32  # the official package views each token's row as 32 x 32


@pytest.fixture(scope="module", params=[(97, 128, 2), (300, 64, 3)], ids=lambda s: f"V{s[0]}-C{s[1]}-L{s[2]}")
def case(request, tmp_path_factory):
    vocab, width, layers = request.param
    d = tmp_path_factory.mktemp(f"de_{vocab}_{width}")
    pth = d / "model.pth"
    torch.save(make_blinkdl_v7(vocab, width, layers, seed=vocab, deep_embed=R), pth)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 17, 40)]
    ref = official_reference(pth, {"full": seqs, "steps": [seqs[1]], "greedy": [[seqs[1], 8]]}, d / "ref.pt",
                             deep_embed=True)
    convert(pth, d / "hf")
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    return model, seqs, ref, pth, d


def test_the_variant_is_read_from_the_tensors(case):
    model, _, _, pth, _ = case
    assert model.config.deep_embed_rank == R and "DeepEmbed" in model.config.describe()
    ffn = model.model.blocks[0].ffn
    assert ffn.s_emb.weight.shape == (model.config.vocab_size, R * R) and ffn.s1.shape == (model.config.hidden_size, R)


def test_one_pass_token_by_token_and_chunks(case):
    model, seqs, ref, _, _ = case
    with torch.no_grad():
        for toks, want in zip(seqs, ref["full"]):
            assert rel_err(model(torch.tensor([toks])).logits[0], want.view(len(toks), -1)) <= TOL
        state, outs = None, []
        for t in seqs[1]:
            out = model(torch.tensor([[t]]), state=state, use_cache=True)
            state = out.state
            outs.append(out.logits[0, -1])
        assert rel_err(torch.stack(outs), ref["steps"][0]) <= TOL
        state, outs, start = None, [], 0
        for end in (5, 23, 40):
            out = model(torch.tensor([seqs[2][start:end]]), state=state, use_cache=True)
            outs.append(out.logits[0])
            state, start = out.state, end
        assert rel_err(torch.cat(outs), ref["full"][2]) <= TOL
        for i, (att_x, wkv, ffn_x) in enumerate(state):
            assert rel_err(wkv[0], ref["full_state"][2][3 * i + 1]) <= TOL
            assert rel_err(ffn_x[0], ref["full_state"][2][3 * i + 2]) <= TOL


def test_greedy_generation_matches(case):
    model, seqs, ref, _, _ = case
    prompt = torch.tensor([seqs[1]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert out[0, len(seqs[1]):].tolist() == ref["greedy"][0]


def test_conversion_is_lossless(case):
    _, _, _, pth, d = case
    original = torch.load(pth, weights_only=True)
    config, sd, _ = load_any(pth)
    back = to_blinkdl(sd, config)
    assert list(back) == list(original) and all(torch.equal(back[k], original[k]) for k in original)
    convert(d / "hf", d / "back.pth")
    again = torch.load(d / "back.pth", weights_only=True)
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_inputs_embeds_is_refused_with_a_reason(case):
    model = case[0]
    with pytest.raises(ValueError, match="DeepEmbed model needs input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, model.config.hidden_size))


def test_lora_state_tuning_and_merge(case, tmp_path):
    """LoRA + state tuning train on it (loss falls), the adapter saves, loads and merges into a .pth that the
    official package's layout keeps (DeepEmbed tensors untouched by the merge)."""
    from rwkv_peft import methods
    from rwkv_peft.merge import merge_adapters
    _, seqs, _, pth, _ = case
    model = methods.load_base_model(str(pth), dtype="float32")
    model = methods.apply_lora(model, r=4, alpha=8, targets="all")
    from rwkv_peft.tuners.state_tuning import apply_state_tuning
    model = apply_state_tuning(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([seqs[2]])
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    methods.save_adapter(model, tmp_path / "adapter")
    merged = merge_adapters(str(pth), [str(tmp_path / "adapter")], dtype="float32")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert rel_err(got, want) <= 1e-4
    assert torch.equal(merged.model.blocks[1].ffn.s_emb.weight,
                       torch.load(pth, weights_only=True)["blocks.1.ffn.s_emb.weight"])
    plain = tmp_path / "plain.pth"
    cfg = merged.config
    torch.save(make_blinkdl_v7(cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers), plain)
    with pytest.raises(methods.AdapterMismatchError, match="deep_embed_rank differs"):
        methods.load_adapter(methods.load_base_model(str(plain), dtype="float32"), str(tmp_path / "adapter"))


def test_tables_stay_in_cpu_memory_when_the_model_moves():
    """deep_embed_on_cpu (the default): moving the model changes the tables' dtype, never their device; the
    forward gathers rows on the CPU and sends them to the hidden state's device."""
    from rwkv_peft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=61, hidden_size=64, num_hidden_layers=1, deep_embed_rank=4))
    table = model.model.blocks[0].ffn.s_emb
    model.to("meta")
    assert table.weight.device.type == "cpu" and model.model.blocks[0].ffn.key.weight.is_meta
    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=61, hidden_size=64, num_hidden_layers=1, deep_embed_rank=4,
                                         deep_embed_on_cpu=False)).to(torch.bfloat16)
    assert type(model.model.blocks[0].ffn.s_emb) is torch.nn.Embedding
    assert model.model.blocks[0].ffn.s_emb.weight.dtype == torch.bfloat16


@pytest.mark.cuda
def test_tables_on_the_cpu_with_the_model_on_a_gpu(case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, seqs, ref, _, _ = case
    gpu = AutoModelForCausalLM.from_pretrained(case[4] / "hf", dtype=torch.float32).cuda().eval()
    assert gpu.model.blocks[0].ffn.s_emb.weight.device.type == "cpu"
    with torch.no_grad():
        got = gpu(torch.tensor([seqs[2]], device="cuda")).logits[0].cpu()
    assert rel_err(got, ref["full"][2].view(len(seqs[2]), -1)) <= 1e-4
