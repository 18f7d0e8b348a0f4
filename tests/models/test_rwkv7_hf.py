"""RWKV-7 behaves like any transformers causal LM: save/load, dtypes, device_map, checkpointing
(generation: tests/models/test_generation.py)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import rwkv_peft  # noqa: F401
from rwkv_peft import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from tests.factories import rel_err


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = RWKV7Config(vocab_size=120, hidden_size=128, num_hidden_layers=2, **kw)
    model = RWKV7ForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init zeroes some maps; make every path matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids(B=2, T=19, seed=1, vocab=120):
    return torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_auto_classes_registered():
    cfg = AutoConfig.for_model(RWKV7Config.model_type, vocab_size=50, hidden_size=64, num_hidden_layers=1)
    assert isinstance(cfg, RWKV7Config)
    assert isinstance(AutoModel.from_config(cfg), RWKV7Model)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), RWKV7ForCausalLM)


def test_sizes_default_from_width():
    cfg = RWKV7Config(hidden_size=2048, num_hidden_layers=24)
    assert (cfg.num_heads, cfg.intermediate_size) == (32, 8192)
    assert (cfg.decay_low_rank, cfg.a_low_rank, cfg.v_low_rank, cfg.gate_low_rank) == (96, 96, 64, 256)
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKV7Config(hidden_size=100)


def test_save_and_load_pretrained(tmp_path):
    model, x = tiny(), ids()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_dtype_and_device_map(tmp_path):
    model, x = tiny(), ids()
    model.save_pretrained(tmp_path)
    bf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu").eval()
    assert bf.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref, got = model(x).logits, bf(x).logits
        state = bf(x).state
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), ref) < 0.05
    assert all(s.dtype == torch.float32 for layer in state for s in layer)  # the state stays fp32


def test_labels_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model, x = tiny(), ids()
    labels = x.clone()
    labels[0, :7] = -100
    out = model(x, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 120), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-6)
    chunked = model(x, labels=labels, return_logits=False, loss_chunk_size=5)
    assert chunked.logits is None and torch.allclose(chunked.loss, want, atol=1e-6)
    from rwkv_peft.models.common import shift_targets
    aligned = model(x, shift_labels=shift_targets(labels), return_logits=False, loss_chunk_size=5)
    assert torch.allclose(aligned.loss, want, atol=1e-6)
    n = int((labels[:, 1:] != -100).sum())
    summed = model(x, labels=labels, return_logits=False, loss_chunk_size=5, num_items_in_batch=1)
    assert torch.allclose(summed.loss, want * n, rtol=1e-5)


def test_chunked_loss_of_a_chunk_with_nothing_to_predict_still_reaches_every_weight():
    model, x = tiny(), ids()
    model.train()
    out = model(x, labels=torch.full_like(x, -100), return_logits=False, loss_chunk_size=4)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert model.head.weight.grad is not None and model.model.emb.weight.grad is not None


def test_inputs_embeds_and_hidden_states():
    model, x = tiny(), ids()
    with torch.no_grad():
        a = model(x, output_hidden_states=True)
        b = model(inputs_embeds=model.model.emb(x))
    assert torch.equal(a.logits, b.logits)
    assert len(a.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.allclose(model.head(a.hidden_states[-1]), a.logits, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, inputs_embeds=model.model.emb(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids()
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        if ckpt:
            # transformers >= 5.2x calls it activation_checkpointing_enable; older 5.x gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_chunked_training_backpropagates_through_the_state():
    x = ids(B=1, T=30)
    one = tiny().train()
    one(x, labels=x).loss.backward()
    two = tiny().train()
    a = two(x[:, :13], use_cache=True, return_logits=True)
    b = two(x[:, 13:], state=a.state)
    logits = torch.cat([a.logits, b.logits], dim=1)
    F.cross_entropy(logits[:, :-1].reshape(-1, 120), x[:, 1:].reshape(-1)).backward()
    for (n, p1), (_, p2) in zip(one.named_parameters(), two.named_parameters()):
        if p1.grad is None:  # layer 0's v-lora is unused, as in the official model
            assert p2.grad is None and "blocks.0.att.v" in n, n
            continue
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6, rtol=1e-4), n


def test_padding_leaves_the_state_untouched():
    model, x = tiny(), ids(B=1, T=11)
    pad = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        ref = model(x)
        left = model(torch.cat([pad, x], 1), attention_mask=torch.cat([pad, torch.ones_like(x)], 1))
        right = model(torch.cat([x, pad], 1), attention_mask=torch.cat([torch.ones_like(x), pad], 1))
    assert rel_err(left.logits[:, 4:], ref.logits) < 1e-5
    assert rel_err(right.logits[:, :11], ref.logits) < 1e-5
    for s_ref, s_l, s_r in zip(ref.state, left.state, right.state):
        for a, b, c in zip(s_ref, s_l, s_r):
            assert rel_err(b, a) < 1e-5 and rel_err(c, a) < 1e-5


def test_learned_initial_state_starts_every_sequence():
    model, x = tiny(use_initial_state=True), ids()
    with torch.no_grad():
        base = model(x).logits
        for block in model.model.blocks:
            block.att.time_state.normal_(0, 0.5)
        tuned = model(x).logits
        explicit = model(x, state=model.init_state(2)).logits
    assert rel_err(tuned, base) > 1e-3
    assert torch.equal(tuned, explicit)
    model.train()
    model(x, labels=x).loss.backward()
    assert all(b.att.time_state.grad is not None and b.att.time_state.grad.abs().sum() > 0
               for b in model.model.blocks)


def test_state_with_wrong_layer_count_is_an_error():
    model, x = tiny(), ids()
    with pytest.raises(ValueError, match="state has 1 layers"):
        model(x, state=model.init_state(2)[:1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_wkv_op_gets_all_six_inputs_in_the_models_dtype(monkeypatch, dtype):
    """A bf16 model hands the WKV op bf16 r, w, k, v, a, b (the log decay rounded too: docs/kernels.md "Decay
    precision"), so a kernel runs its bf16 variant with no fp32 copies; a padded batch too."""
    import rwkv_peft.models.rwkv7.modeling_rwkv7 as modeling
    seen, op = [], modeling.wkv7

    def recording(*xs, **kw):
        seen.append({x.dtype for x in xs})
        return op(*xs, **kw)
    monkeypatch.setattr(modeling, "wkv7", recording)
    model = tiny().to(dtype)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        model(x, attention_mask=mask)
    assert seen and all(s == {dtype} for s in seen)
