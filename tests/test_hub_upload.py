"""``rwkv-peft publish`` / ``hub.publish`` against a stand-in Hub on loopback (tests/hub_server.py): the files and
the model card that arrive, byte for byte; nothing local in them (absolute paths, the user's name); the token sent
to the server and never printed."""
import huggingface_hub.constants
import pytest
import torch

from rwkv_peft.cli import main
from rwkv_peft.convert import convert
from rwkv_peft.hub import publish
from rwkv_peft.methods import apply_lora, apply_state_tuning, load_base_model, save_adapter
from rwkv_peft.recipe import load_recipe
from tests.factories import make_blinkdl_v7
from tests.hub_server import HubServer

TOKEN = "hf_testtoken_0123456789abcdef"
USER = "alicehubtester"


@pytest.fixture()
def local(tmp_path, monkeypatch):
    """A user's machine: home folder and user name of their own, a project folder as the working directory, the
    token in the environment, and huggingface_hub's offline switch off (the server is on loopback)."""
    home = tmp_path / f"home-{USER}"
    project = home / "work" / "persona"
    project.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USER", USER)
    monkeypatch.setenv("LOGNAME", USER)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(project)
    return tmp_path, home, project


@pytest.fixture()
def run_folder(local):
    """outputs/run/adapter (LoRA + state) trained on ~/models/base.pth, with the recipe copy training writes,
    named with absolute paths as a user may write them; plus files an upload must leave behind."""
    tmp_path, home, project = local
    (home / "models").mkdir()
    torch.save(make_blinkdl_v7(vocab=90, width=64, layers=1, head_size=32), home / "models" / "base.pth")
    (project / "data.jsonl").write_text('{"text": "hello"}\n')
    (project / "r.yaml").write_text(f"model:\n  path: {home / 'models' / 'base.pth'}\n  dtype: float32\n"
                                    f"method:\n  lora:\n    enabled: true\n    r: 2\n"
                                    f"data:\n  train: {project / 'data.jsonl'}\n  eval: /srv/corpora/eval.jsonl\n")
    recipe = load_recipe(project / "r.yaml")
    model = load_base_model(str(home / "models" / "base.pth"), dtype="float32")
    model = apply_state_tuning(apply_lora(model, r=2))
    adapter = project / "outputs" / "run" / "adapter"
    save_adapter(model, adapter)
    (adapter.parent / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")  # as training writes it
    (adapter / "checkpoint-10").mkdir()
    (adapter / "checkpoint-10" / "optimizer.pt").write_bytes(b"not uploaded")
    (adapter / ".cache").write_text("not uploaded")
    (adapter / "x.tmp1").write_text("not uploaded")
    return adapter


def _local_markers(tmp_path, home, project):
    return [str(tmp_path), str(home), str(project), USER, "/tmp/", "/home/", "/root/"]


def test_publish_uploads_the_adapter_and_its_card_exactly(local, run_folder, capsys):
    tmp_path, home, project = local
    with HubServer() as hub:
        assert main(["publish", "outputs/run/adapter", "me/persona", "--endpoint", hub.endpoint]) == 0
    out, err = capsys.readouterr()
    assert hub.unexpected == []
    repo = hub.repos["me/persona"]
    assert repo.visibility == "private" and repo.repo_type == "model"

    # exactly the folder's files (the card included), byte for byte; checkpoints, hidden and temp files left
    local_files = {p.relative_to(run_folder).as_posix(): p.read_bytes() for p in run_folder.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and ".tmp" not in p.name
                   and "checkpoint-" not in p.as_posix()}
    assert sorted(repo.files) == sorted(local_files) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "rwkv_peft_adapter.json",
         "state_adapter.safetensors"])
    assert all(repo.files[p] == local_files[p] for p in local_files)
    assert [c["summary"] for c in repo.commits] == ["Upload with rwkv-peft"]

    # nothing local anywhere in what arrived
    for path, content in repo.files.items():
        for marker in _local_markers(tmp_path, home, project):
            assert marker.encode() not in content, (path, marker)
        assert TOKEN.encode() not in content, path

    # the card: metadata, what the adapter is, snippets naming the repository, the recipe with portable paths
    card = repo.files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card and "- state-tuning" in card
    assert "LoRA + state tuning" in card and "RWKV-7 base model (num_hidden_layers 1, hidden_size 64" in card
    assert 'load_adapter(base, "me/persona")' in card
    assert "rwkv-peft merge --base BASE --adapter me/persona --out merged.pth" in card
    assert "path: ~/models/base.pth" in card and "train: data.jsonl" in card and "eval: .../eval.jsonl" in card
    assert '"path": "~/models/base.pth"' in repo.files["rwkv_peft_adapter.json"].decode()
    assert hub.validated == [card]  # the card's metadata passed the Hub's YAML check before the upload

    # the token went to the server on every request, and nowhere else
    assert hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in out + err
    assert f"uploaded outputs/run/adapter to {hub.endpoint}/me/persona/commit/" in out


def test_a_model_folder_through_the_api_public_and_again(local, capsys):
    """``hub.publish(endpoint=...)``; publishing again into the same repository (create_repo exist_ok) adds a
    commit."""
    tmp_path, home, project = local
    torch.save(make_blinkdl_v7(vocab=90, width=64, layers=1, head_size=32), project / "m.pth")
    convert(project / "m.pth", project / "hf")
    with HubServer() as hub:
        msg = publish(project / "hf", "org/tiny-rwkv", private=False, endpoint=hub.endpoint + "/")
        assert msg.startswith(f"uploaded {project / 'hf'} to {hub.endpoint}/org/tiny-rwkv/commit/")
        (project / "hf" / "notes.txt").write_text("second upload")
        publish(project / "hf", "org/tiny-rwkv", private=False, endpoint=hub.endpoint)
    assert hub.unexpected == []
    repo = hub.repos["org/tiny-rwkv"]
    assert repo.visibility == "public" and len(repo.commits) == 2
    assert sorted(repo.files) == sorted(p.name for p in (project / "hf").iterdir())
    assert all(repo.files[name] == (project / "hf" / name).read_bytes() for name in repo.files)
    card = repo.files["README.md"].decode()
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-rwkv")' in card
    assert 'AutoTokenizer.from_pretrained("org/tiny-rwkv")' in card and "1 layers, width 64, vocab 90" in card
    for path, content in repo.files.items():
        for marker in _local_markers(tmp_path, home, project):
            assert marker.encode() not in content, (path, marker)


def test_a_refused_upload_is_an_error_that_does_not_print_the_token(local, run_folder, capsys, monkeypatch):
    """The server refuses the commit (no write access); HF_ENDPOINT read when the command runs."""
    with HubServer() as hub:
        hub.fail_commit_with = (403, f"no write access to me/persona for token {TOKEN}")  # an echoing server
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        assert main(["publish", "outputs/run/adapter", "me/persona"]) == 1
    out, err = capsys.readouterr()
    assert "error: upload failed" in err and "403" in err
    assert TOKEN not in out + err
    assert hub.repos["me/persona"].files == {} and hub.unexpected == []
