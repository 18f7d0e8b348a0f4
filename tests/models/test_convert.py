"""Checkpoint conversion: lossless round trips, fla checkpoints, merged states, and errors that name the problem."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import rwkv_peft  # noqa: F401
from rwkv_peft.cli import main as cli
from rwkv_peft.convert import convert, load_pth
from rwkv_peft.models.rwkv7.convert_rwkv7 import CheckpointError
from tests.factories import make_blinkdl_v7, official_reference, rel_err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pth_hf_pth_round_trip_is_bit_identical(tmp_path, dtype):
    src = tmp_path / "src.pth"
    torch.save(make_blinkdl_v7(vocab=90, width=128, layers=2, dtype=dtype), src)
    assert cli(["convert", str(src), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (128, 2, 90)
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    a, b = torch.load(src, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert (tmp_path / "back.pth").read_bytes() == _resave(a, tmp_path)


def _resave(sd, tmp_path):
    """The bytes torch.save writes for ``sd`` under the same file name (the name is inside the zip)."""
    (tmp_path / "again").mkdir()
    torch.save(sd, tmp_path / "again" / "back.pth")
    return (tmp_path / "again" / "back.pth").read_bytes()


def test_hf_folder_loads_with_auto_classes_in_its_dtype(tmp_path):
    torch.save(make_blinkdl_v7(dtype=torch.bfloat16), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert model.head.weight.dtype == torch.bfloat16


def test_merged_time_state_round_trips_and_matches_official(tmp_path):
    pth = tmp_path / "m.pth"
    torch.save(make_blinkdl_v7(vocab=97, width=128, layers=2, time_state=True, seed=4), pth)
    toks = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = official_reference(pth, {"full": [toks], "state_init": True}, tmp_path / "ref.pt")
    convert(pth, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert model.config.use_initial_state
    with torch.no_grad():
        assert rel_err(model(torch.tensor([toks])).logits[0], ref["full"][0]) <= 1e-5
    convert(tmp_path / "hf", tmp_path / "back.pth")
    assert torch.equal(torch.load(tmp_path / "back.pth")["blocks.1.att.time_state"],
                       torch.load(pth)["blocks.1.att.time_state"])


def _to_fla(sd_ours, layers):
    """Our keys -> flash-linear-attention's (the inverse of what the converter reads)."""
    fla = {"model.embeddings.weight": sd_ours["model.emb.weight"], "lm_head.weight": sd_ours["head.weight"],
           "model.norm.weight": sd_ours["model.ln_out.weight"], "model.norm.bias": sd_ours["model.ln_out.bias"],
           "model.layers.0.pre_norm.weight": sd_ours["model.ln0.weight"],
           "model.layers.0.pre_norm.bias": sd_ours["model.ln0.bias"]}
    for i in range(layers):
        o, f = f"model.blocks.{i}.", f"model.layers.{i}."
        for a, b in (("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm")):
            for wb in ("weight", "bias"):
                fla[f + b + "." + wb] = sd_ours[o + a + "." + wb]
        for a, b in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
            fla[f + f"attn.{b}.weight"] = sd_ours[o + f"att.{a}.weight"]
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            fla[f + "attn." + n] = sd_ours[o + "att." + n].view(1, 1, -1)
        for n in ("k_k", "k_a", "r_k"):
            fla[f + "attn." + n] = sd_ours[o + "att." + n]
        for lora, bias in (("w", "w0"), ("a", "a0"), ("v", "v0"), ("g", None)):
            if lora == "v" and i == 0:
                continue
            fla[f + f"attn.{lora}_lora.lora.0.weight"] = sd_ours[o + f"att.{lora}_lora.down.weight"]
            fla[f + f"attn.{lora}_lora.lora.2.weight"] = sd_ours[o + f"att.{lora}_lora.up.weight"]
            if bias:
                fla[f + f"attn.{lora}_lora.lora.2.bias"] = sd_ours[o + "att." + bias]
        fla[f + "ffn.x_k"] = sd_ours[o + "ffn.x_k"].view(1, 1, -1)
        fla[f + "ffn.key.weight"] = sd_ours[o + "ffn.key.weight"]
        fla[f + "ffn.value.weight"] = sd_ours[o + "ffn.value.weight"]
    return fla


def test_reads_flash_linear_attention_checkpoints(tmp_path):
    torch.save(make_blinkdl_v7(vocab=97, width=128, layers=2, seed=9), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "ours")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    fla_dir = tmp_path / "fla"
    fla_dir.mkdir()
    save_file({k: v.contiguous() for k, v in _to_fla(ours.state_dict(), 2).items()}, str(fla_dir / "model.safetensors"))
    (fla_dir / "config.json").write_text(json.dumps({"model_type": "rwkv7", "hidden_size": 128, "norm_eps": 1e-5}))
    assert cli(["convert", str(fla_dir), str(tmp_path / "from_fla")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from_fla", dtype=torch.float32).eval()
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ours(x).logits)


def _write(tmp_path, sd, name="bad.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_errors_name_the_file_and_key(tmp_path, capsys):
    good = make_blinkdl_v7(vocab=50, width=64, layers=1)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: not a readable PyTorch checkpoint"):
        convert(text, tmp_path / "out")
    full = _write(tmp_path, good, "full.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable"):
        convert(truncated, tmp_path / "out")
    v6 = {"emb.weight": torch.zeros(5, 4), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 4)}
    with pytest.raises(CheckpointError, match="RWKV-6 checkpoint"):
        convert(_write(tmp_path, v6, "v6.pth"), tmp_path / "out")
    missing = dict(good)
    del missing["blocks.0.att.k_k"]
    with pytest.raises(CheckpointError, match=r"missing.pth: missing tensor for 'model.blocks.0.att.k_k'"):
        convert(_write(tmp_path, missing, "missing.pth"), tmp_path / "out")
    extra = {**good, "blocks.0.att.s_emb": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"extra.pth: unexpected key 'blocks.0.att.s_emb'"):
        convert(_write(tmp_path, extra, "extra.pth"), tmp_path / "out")
    wrong = {**good, "blocks.0.att.receptance.weight": torch.zeros(64, 32)}
    with pytest.raises(CheckpointError, match=r"'model.blocks.0.att.receptance.weight' has shape \[64, 32\]"):
        convert(_write(tmp_path, wrong, "wrong.pth"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert cli(["convert", str(tmp_path / "v6.pth"), str(tmp_path / "out")]) == 2
    assert "v6.pth" in capsys.readouterr().err


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: not a readable"):
        load_pth(path)


def test_failed_conversion_keeps_the_existing_destination(tmp_path):
    torch.save(make_blinkdl_v7(vocab=50, width=64, layers=1), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "hf")
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    bad = make_blinkdl_v7(vocab=50, width=64, layers=1)
    del bad["head.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        convert(tmp_path / "bad.pth", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "hf", "m.pth"]


def test_world_vocab_folder_ships_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from rwkv_peft import RWKVWorldTokenizer
    torch.save(make_blinkdl_v7(vocab=65536, width=64, layers=1), tmp_path / "m.pth")
    convert(tmp_path / "m.pth", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(tok, RWKVWorldTokenizer) and tok.eos_token_id == 0
    text = "User: 你好 🌍\n\nAssistant:"
    assert tok.decode(tok(text).input_ids) == text
