"""The transformers conventions every version keeps, written once and parametrized over the versions (ids: the
version's name): left padding leaves the state untouched (logits, state and greedy generation equal the prompt
alone), the chunked loss with gradient checkpointing equals the plain loss and its gradients, bf16 weights keep an
fp32 state, and a learned initial state gets a gradient (versions with state tuning)."""
import pytest
import torch

from rwkv_peft import versions
from tests.factories import make_blinkdl_v7, rel_err
from tests.factories_v4 import make_blinkdl_v4
from tests.factories_v5 import make_blinkdl_v5
from tests.factories_v6 import make_blinkdl_v6

TOL = 1e-5
FACTORIES = {"rwkv7": make_blinkdl_v7, "rwkv6": make_blinkdl_v6, "rwkv5": make_blinkdl_v5,
             "rwkv4": make_blinkdl_v4}
WIDTH = {"rwkv4": 64}  # the others: 128 (two heads of 64)


def _load(name: str, layers: int, seed: int, **extra):
    version = versions.by_name(name)
    config, hf = version.blinkdl_to_hf(FACTORIES[name](61, WIDTH.get(name, 128), layers, seed=seed, **extra),
                                       where=f"{name}.pth")
    model = version.causal_lm_class(config)
    model.load_state_dict(hf, strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=[v.name for v in versions.VERSIONS])
def small(request):
    return _load(request.param, 2, 5)


def test_left_padding_leaves_state_untouched(small):
    g = torch.Generator().manual_seed(2)
    short, long = torch.randint(1, 61, (7,), generator=g), torch.randint(1, 61, (12,), generator=g)
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    mask = torch.stack([torch.cat([torch.zeros(5), torch.ones(7)]), torch.ones(12)]).long()
    with torch.no_grad():
        out = small(batch, attention_mask=mask, use_cache=True)
        alone = small(short[None], use_cache=True)
        gen = small.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        gen_alone = small.generate(short[None], attention_mask=torch.ones(1, 7, dtype=torch.long),
                                   max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.isfinite(out.logits).all()
    assert rel_err(out.logits[0, 5:], alone.logits[0]) <= TOL
    for got, want in zip(out.state, alone.state):
        for a, b in zip(got, want):
            assert rel_err(a[0], b[0]) <= TOL
    assert gen[0, 12:].tolist() == gen_alone[0, 7:].tolist()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_:FutureWarning")  # renamed in transformers 5.2x
def test_chunked_loss_and_checkpointing_match_plain_loss(small):
    x = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(3))
    labels = x.clone()
    labels[0, :4] = -100
    ref = small(x, labels=labels)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in small.named_parameters() if p.grad is not None}
    small.zero_grad()
    small.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    small.train()
    assert all(block.gradient_checkpointing for block in small.model.blocks)
    try:
        out = small(x, labels=labels, return_logits=False, loss_chunk_size=7)
        out.loss.backward()
    finally:
        small.gradient_checkpointing_disable()
        small.eval()
    assert out.logits is None
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for n, p in small.named_parameters():
        if n in want:
            assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6), n
    small.zero_grad()


def test_bf16_weights_keep_an_fp32_state(small):
    x = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(8))
    bf = type(small)(small.config).eval()
    bf.load_state_dict(small.state_dict())
    bf = bf.to(torch.bfloat16)
    with torch.no_grad():
        ref = small(x).logits
        out = bf(x, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and rel_err(out.logits.float(), ref) < 0.05
    assert all(s.dtype == torch.float32 for layer in out.state for s in layer)


@pytest.mark.parametrize("name", [v.name for v in versions.VERSIONS if v.state_tuning])
def test_learned_initial_state_gets_gradient(name):
    model = _load(name, 1, 6, time_state=True)
    model.requires_grad_(False)
    ts = model.model.blocks[0].att.time_state
    ts.requires_grad_(True)
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    model(x, labels=x).loss.backward()
    assert ts.grad is not None and ts.grad.abs().sum() > 0
