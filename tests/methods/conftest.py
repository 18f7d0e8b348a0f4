"""Tiny RWKV-7 bases for the method tests (width 128 = 2 heads x 64, 2 layers, vocab 97)."""
import pytest
import torch

import rwkv_peft  # noqa: F401  (registers the Auto classes)
from rwkv_peft.convert import convert
from tests.factories import make_blinkdl_v7

VOCAB, WIDTH, LAYERS = 97, 128, 2


@pytest.fixture(scope="session")
def base_pth(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    path = d / "base.pth"
    torch.save(make_blinkdl_v7(VOCAB, WIDTH, LAYERS, seed=11), path)
    return path


@pytest.fixture(scope="session")
def base_hf(base_pth, tmp_path_factory):
    out = tmp_path_factory.mktemp("base_hf") / "hf"
    convert(base_pth, out)
    return out


@pytest.fixture(scope="session")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 16), generator=g)


@pytest.fixture(scope="session")
def probe():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (1, 12), generator=g)


def train(model, batch, steps: int = 6, lr: float = 1e-2):
    """A plain AdamW loop on one fixed batch; returns the losses."""
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def falling(losses) -> bool:
    return losses[-1] < losses[0] - 0.05 and all(torch.isfinite(torch.tensor(losses)))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()
