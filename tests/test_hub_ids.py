"""A Hub repository id wherever a command takes a model or an adapter path: read through huggingface_hub's cache
(snapshot_download), offline-aware with a clear error. The tests run offline against a cache laid out as
huggingface_hub lays it out (refs/main -> snapshots/<commit>/...), so nothing downloads."""
import pytest
import torch

from rwkv_peft.cli import main
from rwkv_peft.commands._common import UsageError, resolve_input
from tests.factories import make_blinkdl_v7

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding one model repository, "someone/tiny-rwkv7" (an HF folder of ours)."""
    from huggingface_hub import constants

    from rwkv_peft.convert import convert
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-rwkv7"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    torch.save(make_blinkdl_v7(97, 64, 1, head_size=32), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", repo / "snapshots" / COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_a_cached_repository_is_a_model_path(hub_cache, tmp_path):
    assert resolve_input("someone/tiny-rwkv7", "MODEL") == hub_cache
    assert main(["convert", "someone/tiny-rwkv7", str(tmp_path / "out.pth")]) == 0
    original, back = torch.load(tmp_path / "m.pth", weights_only=True), torch.load(tmp_path / "out.pth",
                                                                                  weights_only=True)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_offline_without_the_repository_says_what_to_do(hub_cache, capsys):
    with pytest.raises(UsageError, match=r"MODEL 'someone/other': no such file or folder here, and not in the "
                                         r"Hugging Face cache while the Hub cannot be reached"):
        resolve_input("someone/other", "MODEL")
    assert main(["convert", "someone/other", "x.pth"]) == 2
    assert "download it once online" in capsys.readouterr().err


def test_paths_with_a_suffix_never_go_to_the_hub(hub_cache):
    with pytest.raises(UsageError, match=r"no such file or folder \(expected a BlinkDL .pth"):
        resolve_input("models/missing.pth", "MODEL")


def test_an_adapter_repository_loads_and_merges(hub_cache, tmp_path):
    """load_adapter(base, "owner/name") (what published model cards show) and merge --adapter owner/name."""
    from rwkv_peft import methods
    base = methods.load_base_model("someone/tiny-rwkv7", dtype="float32")  # what the model card shows
    model = methods.apply_lora(base, r=2, alpha=4)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    repo = hub_cache.parents[2] / "models--someone--tiny-adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    methods.save_adapter(model, repo / "snapshots" / COMMIT)
    ids = torch.tensor([[1, 5, 9, 2]])
    loaded = methods.load_adapter(methods.load_base_model(str(hub_cache), dtype="float32"), "someone/tiny-adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["merge", "--adapter", "someone/tiny-adapter", "--base", "someone/tiny-rwkv7", "--out",
                 str(tmp_path / "merged.pth")]) == 0
    assert (tmp_path / "merged.pth").is_file()
