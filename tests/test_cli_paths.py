"""From the quickstart to using the result: model arguments (``assets:``, adapter-recorded bases), chat on the
quickstart model with an adapter, streaming decode for any tokenizer, output paths a command cannot write, and
the commands ``train`` prints at the end."""
import io
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rwkv_peft.cli import main
from rwkv_peft.recipe import ASSETS_DIR, resolve_path

QS = "assets:quickstart/model"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The quickstart model is tiny (width 128): one thread is as fast, and far faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _text_files(folder: Path):
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".md", ".txt", ".yaml"):
            yield p, p.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA + state adapter on the quickstart model, made with the methods API (no training: random deltas)."""
    from rwkv_peft.methods import apply_lora, apply_state_tuning, load_base_model, save_adapter
    torch.manual_seed(0)
    model = load_base_model(resolve_path(QS), dtype="float32")
    model = apply_lora(model, r=4, alpha=8)
    model = apply_state_tuning(model, init="zeros")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
            elif name.endswith("time_state"):
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("qs") / "run" / "adapter"
    save_adapter(model, out)
    return out


def _chat(monkeypatch, capsys, args, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _replies(out: str):
    return [block.split("Assistant:", 1)[1] for block in out.split("\n\n") if block.startswith("Assistant:")]


# ---- the adapter records its base portably ------------------------------------------------------------------

def test_adapter_records_the_assets_spec_and_no_local_paths(adapter):
    from rwkv_peft.methods import read_manifest
    assert read_manifest(adapter)["base"]["path"] == QS
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == QS
    for path, text in _text_files(adapter):
        for local in {str(ASSETS_DIR), os.getcwd(), str(Path.home())} - {"/"}:
            assert local not in text, f"{path.name} holds the local path {local}"


def test_portable_path_and_adapter_base_resolution(tmp_path, monkeypatch):
    from rwkv_peft.methods.adapter_io import MANIFEST
    from rwkv_peft.paths import BaseNotFoundError, adapter_base, portable_path
    assert portable_path(ASSETS_DIR / "quickstart" / "model") == QS
    assert portable_path(QS) == QS and portable_path("models/x.pth") == "models/x.pth"
    assert portable_path("~/m.pth") == "~/m.pth"
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "x.pth").write_bytes(b"")
    monkeypatch.chdir(project)
    assert portable_path(project / "models" / "x.pth") == "models/x.pth"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert portable_path(tmp_path / "elsewhere" / "y.pth") == "~/elsewhere/y.pth"
    # a relative base: the current directory first, then the folders holding the adapter
    ad = project / "outputs" / "run" / "adapter"
    ad.mkdir(parents=True)
    (ad / MANIFEST).write_text(json.dumps({"base": {"path": "models/x.pth"}}))
    monkeypatch.chdir(tmp_path)
    assert adapter_base(ad) == ("models/x.pth", project / "models" / "x.pth")
    (ad / MANIFEST).write_text(json.dumps({"base": {"path": "models/gone.pth"}}))
    with pytest.raises(BaseNotFoundError, match="'models/gone.pth'"):
        adapter_base(ad)
    (ad / MANIFEST).write_text(json.dumps({"base": {"path": None}}))
    with pytest.raises(BaseNotFoundError, match="records no base"):
        adapter_base(ad)


# ---- model arguments ----------------------------------------------------------------------------------------

def test_commands_take_assets_specs(tmp_path, adapter, monkeypatch, capsys):
    assert main(["generate", QS, "--prompt", "User: Tell me about bread.\n\nAssistant:", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    assert "Bread" in capsys.readouterr().out
    assert main(["convert", QS, str(tmp_path / "conv")]) == 0
    assert "assets:quickstart/model (hf) ->" in capsys.readouterr().out
    assert (tmp_path / "conv" / "tokenizer.json").is_file()  # the folder carries the source's tokenizer
    assert main(["export", QS, str(tmp_path / "m.pth")]) == 0
    assert "--tokenizer assets:quickstart/model" in capsys.readouterr().err  # a .pth holds no tokenizer
    assert main(["merge", "--base", QS, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "into assets:quickstart/model" in capsys.readouterr().out
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    code, out, _ = _chat(monkeypatch, capsys, [str(tmp_path / "merged"), "--temperature", "0",
                                               "--max-new-tokens", "4"], ["hi"])
    assert code == 0 and len(_replies(out)) == 1
    before = sorted(p.name for p in (ASSETS_DIR / "quickstart" / "model").iterdir())
    assert main(["publish", QS, "me/tiny", "--dry-run"]) == 0
    assert "RWKV-7 model (4 layers" in capsys.readouterr().out
    assert sorted(p.name for p in (ASSETS_DIR / "quickstart" / "model").iterdir()) == before  # never written to
    assert main(["generate", "assets:nothing", "--prompt", "x"]) == 2
    assert "MODEL 'assets:nothing': no such file or folder (the package ships assets:quickstart/model)" \
        in capsys.readouterr().err


def test_eval_takes_an_assets_model(tmp_path, capsys):
    assert main(["eval", str(RECIPE), "--model", QS, "--json", "--set", f"data.cache_dir={tmp_path}",
                 "--set", "eval.max_batches=1", "--set", "data.max_length=48"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == QS and result["tokens"] > 0


def test_adapter_alone_uses_the_recorded_base(tmp_path, adapter, monkeypatch, capsys):
    prompt = ["--prompt", "User: Who are you?\n\nAssistant:", "--temperature", "0", "--max-new-tokens", "5"]
    assert main(["generate", QS, "--adapter", str(adapter), *prompt]) == 0
    explicit = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # the recorded spec does not depend on the working directory
    assert main(["generate", "--adapter", str(adapter), *prompt]) == 0
    assert capsys.readouterr().out == explicit
    assert main(["merge", "--adapter", str(adapter), "--out", "m.pth"]) == 0
    assert "into assets:quickstart/model" in capsys.readouterr().out and Path("m.pth").is_file()
    assert main(["export", str(adapter), "merged", "--what", "model"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    capsys.readouterr()
    # neither a model nor an adapter; an adapter that records no base
    assert main(["generate", "--prompt", "x"]) == 2
    assert "no model given: pass MODEL" in capsys.readouterr().err
    code, _, err = _chat(monkeypatch, capsys, [], ["hi"])
    assert code == 2 and "--adapter DIR" in err
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    manifest = json.loads((bare / "rwkv_peft_adapter.json").read_text())
    manifest["base"]["path"] = None
    (bare / "rwkv_peft_adapter.json").write_text(json.dumps(manifest))
    code, _, err = _chat(monkeypatch, capsys, ["--adapter", str(bare)], ["hi"])
    assert code == 2 and "records no base model path" in err and "pass MODEL" in err
    assert main(["merge", "--adapter", str(bare), "--out", "x.pth"]) == 2
    assert "pass --base" in capsys.readouterr().err


# ---- chat ---------------------------------------------------------------------------------------------------

def test_chat_on_the_quickstart_model_with_an_adapter(adapter, monkeypatch, capsys):
    args = [QS, "--adapter", str(adapter), "--temperature", "0", "--max-new-tokens", "6"]
    lines = ["Tell me about bread.", "Can you explain trains?", "/reset", "Tell me about bread.", "/help",
             "/bogus", "/quit", "never answered"]
    code, out, err = _chat(monkeypatch, capsys, args, lines)
    assert code == 0, err
    replies = _replies(out)
    assert len(replies) == 3 and all(r.strip() for r in replies)
    assert replies[2] == replies[0]  # /reset went back to the starting (persona) state
    assert "(conversation reset to the starting state)" in out
    assert "/reset" in out.split("commands:", 1)[1]  # /help
    assert "unknown command /bogus" in out
    assert "\ufffd" not in out
    code, out2, _ = _chat(monkeypatch, capsys, args, ["/exit", "never answered"])  # /exit as /quit
    assert code == 0 and _replies(out2) == []


def test_conversation_reset_restores_the_state_after_the_system_prompt(adapter):
    from rwkv_peft.commands._common import load_for_inference
    from rwkv_peft.commands.chat import Conversation
    model, tok = load_for_inference(QS, adapter)
    chat = Conversation(model, tok)
    chat.feed("You are terse.\n\n")
    chat.mark_start()
    start = [t.clone() for t in chat.state[0]]
    first = "".join(chat.reply("hi", max_new_tokens=5, temperature=0))
    assert not torch.equal(chat.state[0][1], start[1])
    chat.reset()
    assert all(torch.equal(a, b) for a, b in zip(chat.state[0], start))
    assert "".join(chat.reply("hi", max_new_tokens=5, temperature=0)) == first


# ---- streaming decode ---------------------------------------------------------------------------------------

def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (▁ marks a space; the decoder drops the first one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pieces = ["<unk>", "<|endoftext|>", "▁", "▁Ahoy", "!", "▁be", "▁arr", "a", "r", "h", "o", "y", "é", "▁é"]
    tok = Tokenizer(models.Unigram([(p, -float(len(pieces) - i)) for i, p in enumerate(pieces)], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")


@pytest.mark.parametrize("which", ["quickstart", "world", "metaspace"])
def test_stream_decoder_matches_a_whole_decode(which):
    from rwkv_peft.commands._common import StreamDecoder
    if which == "quickstart":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(resolve_path(QS)))
        text = "Ahoy! é 日本 naïve 🏴‍☠️\n\nUser: arr"
    elif which == "world":
        from rwkv_peft.tokenization import RWKVWorldTokenizer
        tok = RWKVWorldTokenizer()
        text = "Ahoy! é 日本 naïve 🏴‍☠️\n\nUser: arr"
    else:
        tok = _metaspace_tokenizer()
        text = "Ahoy! be arr é hoy"
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    stream = StreamDecoder(tok, skip_special_tokens=True)
    pieces = [stream.put(i) for i in ids] + [stream.end()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any("\ufffd" in p for p in pieces)  # incomplete UTF-8 is held back, never shown half
    if which == "quickstart":  # 'é' is two byte tokens: the first one shows nothing yet
        first, second = tok("é", add_special_tokens=False).input_ids
        s = StreamDecoder(tok)
        assert s.put(first) == "" and s.put(second) == "é"
        s = StreamDecoder(tok)
        assert s.put(first) == "" and s.end() == "\ufffd"  # flushed at the end as the replacement character


# ---- outputs a command cannot write -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["export", QS, "{tmp}/out.onnx"], "export (a model) does not write .onnx files; it writes a .pth file"),
    (["export", "{adapter}", "{tmp}/out.onnx"], "export (a state) does not write .onnx files"),
    (["export", "{adapter}", "{tmp}/out"], "does not write folders; it writes a .pth file (runtime state) or a "
                                           ".safetensors file (state adapter) (add --what model"),
    (["export", "{adapter}", "{tmp}/out.bin", "--what", "model"], "does not write .bin files"),
    (["merge", "--adapter", "{adapter}", "--out", "{tmp}/m.gguf"], "merge does not write .gguf files"),
    (["convert", QS, "{tmp}/c.safetensors"], "convert does not write .safetensors files"),
])
def test_an_output_suffix_the_command_does_not_write_is_an_error(argv, expected, tmp_path, adapter, capsys):
    argv = [a.format(tmp=tmp_path, adapter=adapter) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "error: " in err
    assert "folder" in err or ".safetensors" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---- train ends with the commands that use its result --------------------------------------------------------

def test_train_prints_commands_that_work_as_printed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rwkv_peft.methods")
    monkeypatch.chdir(tmp_path)
    shutil.copy(RECIPE, "quickstart.yaml")
    sets = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "data.max_length=48",
            "--set", "eval.prompts=[]", "--set", "eval.at_end=false", "--set", "eval.max_batches=1",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "output.overwrite=true"]
    assert main(["train", "quickstart.yaml", "--progress", "off", *sets]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == "outputs/quickstart/adapter"
    steps = cap.err.split("Next steps", 1)[1]
    commands = [line.strip() for line in steps.splitlines() if line.strip().startswith("rwkv-peft ")]
    assert commands[:4] == [
        "rwkv-peft chat assets:quickstart/model --adapter outputs/quickstart/adapter",
        "rwkv-peft merge --base assets:quickstart/model --adapter outputs/quickstart/adapter "
        "--out outputs/quickstart/merged",
        "rwkv-peft chat outputs/quickstart/merged",
        "rwkv-peft export outputs/quickstart/adapter outputs/quickstart/state.pth",
    ]
    assert commands[4].startswith("rwkv-peft eval quickstart.yaml --set data.max_length=48 --set 'eval.prompts=[]'")
    assert "overwrite" not in commands[4] and "train." not in commands[4]
    assert str(tmp_path) not in steps.replace(f"data.cache_dir={tmp_path / 'cache'}", "")
    for command in commands:  # each one runs as printed
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        argv = shlex.split(command)[1:]
        if argv[0] == "chat":
            argv += ["--max-new-tokens", "3"]
        assert main(argv) == 0, command
    assert Path("outputs/quickstart/state.pth").is_file() and Path("outputs/quickstart/merged").is_dir()
