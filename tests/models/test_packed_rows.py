"""Packed rows where every sample starts from the initial state (position_ids / cu_seqlens), for every version:
logits equal each sample run alone, gradients equal the sum over the samples run alone (the learned initial
states' included), and a packed row run in chunks equals one pass."""
import pytest
import torch

from rwkv_peft import versions
from rwkv_peft.convert import load_any
from rwkv_peft.models import rows
from tests.factories import make_blinkdl_v7
from tests.factories_v4 import make_blinkdl_v4
from tests.factories_v5 import make_blinkdl_v5
from tests.factories_v6 import make_blinkdl_v6

FACTORIES = {"rwkv7": make_blinkdl_v7, "rwkv6": make_blinkdl_v6, "rwkv5": make_blinkdl_v5,
             "rwkv4": make_blinkdl_v4}
LENGTHS = [[5, 9, 3], [7, 1, 6]]   # two rows of packed samples; the second row is right-padded by 3


def _model(name: str, tmp_path, learned: bool, vocab: int = 61):
    """A tiny random model of version ``name``; ``learned``: random learned initial WKV and shift states."""
    path = tmp_path / f"{name}.pth"
    torch.save(FACTORIES[name](vocab, 128, 2), path)
    config, sd, _ = load_any(path)
    version = versions.by_name(name)
    if learned:
        config.use_initial_state = config.use_initial_shift = True
    model = version.causal_lm_class(config)
    model.load_state_dict(sd, strict=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("time_state", "shift_state")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.float().eval()


def _packed(lengths, seed=0):
    """(samples [list of [n] ids], input_ids [B, T], position_ids [B, T], attention_mask [B, T])."""
    g = torch.Generator().manual_seed(seed)
    T = max(sum(row) for row in lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    pos = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    samples = []
    for b, row in enumerate(lengths):
        t = 0
        for n in row:
            s = torch.randint(1, 61, (n,), generator=g)
            samples.append((b, t, s))
            ids[b, t:t + n], pos[b, t:t + n], mask[b, t:t + n] = s, torch.arange(n), 1
            t += n
        pos[b, t:] = torch.arange(1, T - t + 1)  # padding: anything but 0
    return samples, ids, pos, mask


@pytest.fixture(params=[v.name for v in versions.VERSIONS])
def name(request):
    return request.param


@pytest.fixture(params=["one piece", "pieces"])
def pieces(request, monkeypatch):
    """The WKV op on the gathered samples in one call, or in pieces of 2 tokens (at most 4 calls) with the state
    carried between them and the samples that have ended left out."""
    if request.param == "pieces":
        monkeypatch.setattr(rows, "PIECE_MULTIPLE", 2)
        monkeypatch.setattr(rows, "MAX_PIECES", 4)
    return request.param


def test_segments_run_longest_first_in_pieces(monkeypatch):
    monkeypatch.setattr(rows, "PIECE_MULTIPLE", 2)
    monkeypatch.setattr(rows, "MAX_PIECES", 4)
    _, ids, pos, mask = _packed(LENGTHS)
    starts = rows.sample_starts(*ids.shape, position_ids=pos)
    seg = rows.Segments(starts)
    assert seg.sorted_lengths == [9, 9, 7, 5, 3, 1]  # the second row's last sample holds its 3 padding tokens
    assert seg.order[:2].tolist() == [1, 5] and seg.length == seg.span == 9
    seg = rows.Segments(starts, mask)                # the padding after a segment's last real token is not run
    assert seg.sorted_lengths == [9, 7, 6, 5, 3, 1] and seg.order.tolist() == [1, 3, 5, 0, 2, 4]
    assert list(seg.pieces()) == [(0, 4, 6), (4, 8, 4), (8, 9, 1)]
    x = torch.arange(ids.numel(), dtype=torch.float32).view(*ids.shape, 1)
    gathered = seg.gather(x)                                               # [S, span = 9, 1]
    assert gathered.shape == (6, 9, 1) and gathered[0, :, 0].tolist() == list(range(5, 14))
    assert gathered[2, :, 0].tolist() == list(range(25, 34))               # 6 real, then the row's padding
    assert gathered[5, 1:].abs().sum() == 0
    assert torch.equal(seg.scatter(gathered), x)


@pytest.mark.parametrize("learned", [False, True])
def test_packed_logits_equal_each_sample_alone(name, learned, pieces, tmp_path):
    if learned and not versions.by_name(name).state_tuning:
        pytest.skip(f"{name} has no learned initial state")
    model = _model(name, tmp_path, learned)
    samples, ids, pos, mask = _packed(LENGTHS)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
        for b, t, s in samples:
            alone = model(input_ids=s[None]).logits[0]
            assert torch.allclose(packed[b, t:t + len(s)], alone, rtol=1e-5, atol=1e-5), (b, t)


def test_cu_seqlens_marks_the_same_starts(name, tmp_path):
    model = _model(name, tmp_path, False)
    samples, ids, pos, _ = _packed([[5, 9, 3]])
    cu = torch.tensor([0, 5, 14, 17])
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=pos).logits
        b = model(input_ids=ids, cu_seqlens=cu).logits
        c = model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=0, rtol=0)
    assert not torch.allclose(a[0, 5:], c[0, 5:], atol=1e-3)  # without the starts, later samples see earlier ones
    assert torch.allclose(a[0, :5], c[0, :5], atol=1e-6)


def test_position_ids_counting_up_change_nothing(name, tmp_path):
    model = _model(name, tmp_path, False)
    _, ids, _, _ = _packed([[9], [9]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        counted = model(input_ids=ids, position_ids=torch.arange(9).expand(2, 9)).logits
    assert torch.equal(plain, counted)


def test_packed_gradients_are_the_sum_over_samples(name, pieces, tmp_path):
    learned = versions.by_name(name).state_tuning
    model = _model(name, tmp_path, learned).train()
    samples, ids, pos, mask = _packed(LENGTHS, seed=1)
    weights = torch.randn(*ids.shape, 61, generator=torch.Generator().manual_seed(5))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    packed = grads((packed_logits * weights * mask[..., None]).sum())
    alone_loss = sum((model(input_ids=s[None]).logits[0] * weights[b, t:t + len(s)]).sum() for b, t, s in samples)
    alone = grads(alone_loss)
    assert set(packed) == set(alone)
    if learned:
        assert any(n.endswith("time_state") for n in alone) and any(n.endswith("shift_state") for n in alone)
    for n in alone:
        assert (packed[n] - alone[n]).abs().max() <= 1e-4 * alone[n].abs().max() + 1e-6, n


def test_packed_row_in_chunks_equals_one_pass(name, tmp_path):
    """A chunk that begins inside a sample continues from the carried state; one that begins a sample resets."""
    model = _model(name, tmp_path, versions.by_name(name).state_tuning)
    _, ids, pos, _ = _packed([[5, 9, 3], [4, 4, 9]], seed=2)
    with torch.no_grad():
        whole = model(input_ids=ids, position_ids=pos).logits
        state, parts = None, []
        for s, e in ((0, 4), (4, 8), (8, 17)):  # row 2's second chunk starts exactly at a sample start
            out = model(input_ids=ids[:, s:e], position_ids=pos[:, s:e], state=state, use_cache=True)
            state, parts = out.state, parts + [out.logits]
    assert torch.allclose(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)


def test_bad_cu_seqlens_is_refused(tmp_path):
    model = _model("rwkv7", tmp_path, False)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to B\\*T = 6"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 3, 6]))


def test_trl_padding_free_batches(tmp_path):
    """TRL's padding-free collator (one flattened row, position_ids restarting at 0) and transformers'
    DataCollatorWithFlattening give our model the loss of the samples run alone, and SFTTrainer trains with it."""
    from transformers import DataCollatorWithFlattening
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    model = _model("rwkv7", tmp_path, True)
    samples, _, _, _ = _packed(LENGTHS, seed=4)
    examples = [{"input_ids": s.tolist()} for _, _, s in samples]
    with torch.no_grad():
        alone = [model(input_ids=s[None], labels=s[None]).loss * (len(s) - 1) for _, _, s in samples if len(s) > 1]
        want = sum(alone) / sum(len(s) - 1 for _, _, s in samples)
        for collator in (DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
                         DataCollatorWithFlattening()):
            batch = collator([dict(e) for e in examples])
            assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"] == 0).sum() == len(samples)
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
            assert abs(float(got) - float(want)) < 1e-5 * float(want), type(collator).__name__


def test_trl_sft_trainer_runs_padding_free(tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer
    from tests.training.helpers import byte_tokenizer
    tok = byte_tokenizer()
    model = _model("rwkv7", tmp_path, False, vocab=len(tok)).train()
    ds = datasets.Dataset.from_list([{"text": f"sample {i} " * (1 + i % 4)} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), padding_free=True, per_device_train_batch_size=4,
                     max_steps=3, learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no",
                     use_cpu=True, dataset_num_proc=None, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    seen = []
    original = model.forward

    def spy(*a, **kw):
        seen.append(kw.get("position_ids"))
        return original(*a, **kw)
    model.forward = spy
    trainer.train()
    assert seen and all(p is not None and p.shape[0] == 1 and int((p == 0).sum()) == 4 for p in seen)


@pytest.mark.cuda
@pytest.mark.parametrize("name, kernel", [("rwkv7", "cuda"), ("rwkv7", "fla"), ("rwkv6", "fla")])
def test_packed_rows_on_each_gpu_path(name, kernel, tmp_path, monkeypatch):
    """On a GPU, with the WKV path forced (our kernel, fla): packed logits equal each sample alone, and the
    learned states' gradients equal the sum over the samples (fp32, kernel tolerance)."""
    if kernel == "fla":
        pytest.importorskip("fla")
    monkeypatch.setenv("RWKV_PEFT_KERNEL", kernel)
    model = _model(name, tmp_path, True).cuda().train()
    samples, ids, pos, mask = _packed(LENGTHS, seed=6)
    ids, pos, mask = ids.cuda(), pos.cuda(), mask.cuda()
    weights = torch.randn(*ids.shape, 61, generator=torch.Generator().manual_seed(7)).cuda()
    packed_logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    model.zero_grad()
    (packed_logits * weights * mask[..., None]).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("time_state", "shift_state"))}
    model.zero_grad()
    total = 0
    for b, t, s in samples:
        alone = model(input_ids=s[None].cuda()).logits[0]
        assert (packed_logits[b, t:t + len(s)] - alone).abs().max() <= 1e-3 * alone.abs().max(), (b, t)
        total = total + (alone * weights[b, t:t + len(s)]).sum()
    total.backward()
    for n, p in model.named_parameters():
        if n in packed:
            assert (packed[n] - p.grad).abs().max() <= 1e-3 * p.grad.abs().max() + 1e-6, n
