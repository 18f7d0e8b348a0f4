"""GGUF export for llama.cpp: every tensor llama.cpp's loader asks for (name, shape, type), the metadata keys, the
World tokenizer arrays, exact f32 values, q8_0/bf16/f16 within their rounding, the CLI (adapter merged on export)
and the refusals. The expected layouts below are written from llama.cpp's loader (``load_arch_tensors`` of
rwkv7/rwkv6) and converter (``convert_hf_to_gguf.py``), not from rwkv_peft.export_gguf."""
import ast
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from rwkv_peft.cli import main  # noqa: E402
from rwkv_peft.convert import convert  # noqa: E402
from rwkv_peft.tokenization.tokenization_rwkv_world import DEFAULT_VOCAB_FILE  # noqa: E402
from tests.factories import make_blinkdl_v7  # noqa: E402
from tests.factories_v5 import make_blinkdl_v5  # noqa: E402
from tests.factories_v6 import make_blinkdl_v6  # noqa: E402

V, C, L = 65536, 64, 2         # the World vocabulary; one head of 64
DV = 16                        # RWKV-7 value-mix rank: unlike the others (32), and not a multiple of 32 (q8_0 -> f16)


def _v7_sd(**kw):
    sd = make_blinkdl_v7(V, C, L, seed=3, **kw)
    for i in range(L):
        sd[f"blocks.{i}.att.v1"] = sd[f"blocks.{i}.att.v1"][:, :DV].contiguous()
        sd[f"blocks.{i}.att.v2"] = sd[f"blocks.{i}.att.v2"][:DV].contiguous()
    return sd


@pytest.fixture(scope="module")
def v7(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf7") / "tiny7.pth"
    torch.save(_v7_sd(), path)
    return path


@pytest.fixture(scope="module")
def v6(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf6") / "tiny6.pth"
    torch.save(make_blinkdl_v6(V, C, L, seed=4), path)
    return path


def _export(src, out, *extra):
    assert main(["export", str(src), str(out), *extra]) == 0
    return gguf.GGUFReader(str(out))


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) > 1:  # an array
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]) for i in f.data]
        return [int(f.parts[i][0]) for i in f.data]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def _ne(t):
    ne = [int(n) for n in t.shape]
    return tuple(ne + [1] * (4 - len(ne)))


def _pad(shape):
    return tuple(list(shape) + [1] * (4 - len(shape)))


# ---- what llama.cpp's loader requires (ggml order: ne0 first) ------------------------------------------------

def loader_v7(F, dw, da, dv, dg):
    req = {"token_embd.weight": (C, V), "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
           "output_norm.weight": (C,), "output_norm.bias": (C,), "output.weight": (C, V)}
    for i in range(L):
        p = f"blk.{i}."
        rv = da if i == 0 else dv  # layer 0: "actually not used", shaped like the a-lora
        req.update({p + "attn_norm.weight": (C,), p + "attn_norm.bias": (C,), p + "attn_norm_2.weight": (C,),
                    p + "attn_norm_2.bias": (C,), p + "time_mix_w0.weight": (C,), p + "time_mix_w1.weight": (C, dw),
                    p + "time_mix_w2.weight": (dw, C), p + "time_mix_a0.weight": (C,),
                    p + "time_mix_a1.weight": (C, da), p + "time_mix_a2.weight": (da, C),
                    p + "time_mix_v0.weight": (C,), p + "time_mix_v1.weight": (C, rv),
                    p + "time_mix_v2.weight": (rv, C), p + "time_mix_g1.weight": (C, dg),
                    p + "time_mix_g2.weight": (dg, C), p + "time_mix_lerp_fused.weight": (C, 1, 1, 6),
                    p + "time_mix_k_k.weight": (C,), p + "time_mix_k_a.weight": (C,), p + "time_mix_r_k.weight": (C,),
                    p + "time_mix_key.weight": (C, C), p + "time_mix_value.weight": (C, C),
                    p + "time_mix_receptance.weight": (C, C), p + "time_mix_ln.weight": (C,),
                    p + "time_mix_ln.bias": (C,), p + "time_mix_output.weight": (C, C),
                    p + "channel_mix_lerp_k.weight": (C, 1, 1), p + "channel_mix_key.weight": (C, F),
                    p + "channel_mix_value.weight": (F, C)})
    return req


def loader_v6(F, dm, dd, N=64):
    req = {"token_embd.weight": (C, V), "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
           "output_norm.weight": (C,), "output_norm.bias": (C,), "output.weight": (C, V)}
    for i in range(L):
        p = f"blk.{i}."
        req.update({p + "attn_norm.weight": (C,), p + "attn_norm.bias": (C,), p + "attn_norm_2.weight": (C,),
                    p + "attn_norm_2.bias": (C,), p + "time_mix_w1.weight": (C, dm * 5),
                    p + "time_mix_w2.weight": (dm, C, 5), p + "time_mix_lerp_x.weight": (C, 1, 1),
                    p + "time_mix_lerp_fused.weight": (C, 1, 1, 5), p + "time_mix_first.weight": (N, C // N),
                    p + "time_mix_decay.weight": (C,), p + "time_mix_decay_w1.weight": (C, dd),
                    p + "time_mix_decay_w2.weight": (dd, C), p + "time_mix_key.weight": (C, C),
                    p + "time_mix_value.weight": (C, C), p + "time_mix_receptance.weight": (C, C),
                    p + "time_mix_gate.weight": (C, C), p + "time_mix_ln.weight": (C,), p + "time_mix_ln.bias": (C,),
                    p + "time_mix_output.weight": (C, C), p + "channel_mix_lerp_k.weight": (C, 1, 1),
                    p + "channel_mix_lerp_r.weight": (C, 1, 1), p + "channel_mix_key.weight": (C, F),
                    p + "channel_mix_value.weight": (F, C), p + "channel_mix_receptance.weight": (C, C)})
    return req


# ---- our weights in llama.cpp's layout, written out per tensor (the documented transforms) ---------------------

def expected_v7(sd):
    e = {"token_embd.weight": sd["emb.weight"], "token_embd_norm.weight": sd["blocks.0.ln0.weight"],
         "token_embd_norm.bias": sd["blocks.0.ln0.bias"], "output_norm.weight": sd["ln_out.weight"],
         "output_norm.bias": sd["ln_out.bias"], "output.weight": sd["head.weight"]}
    for i in range(L):
        p, a, f = f"blk.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for n in ("1", "2"):
            e[p + f"attn_norm{'' if n == '1' else '_2'}.weight"] = sd[f"blocks.{i}.ln{n}.weight"]
            e[p + f"attn_norm{'' if n == '1' else '_2'}.bias"] = sd[f"blocks.{i}.ln{n}.bias"]
        e[p + "time_mix_lerp_fused.weight"] = torch.stack([sd[a + "x_" + c].reshape(C) for c in "rwkvag"])
        for x in "wav":
            src = "a" if (x == "v" and i == 0) else x  # layer 0's unused value mix: a copy of the a-lora
            e[p + f"time_mix_{x}0.weight"] = sd[a + src + "0"].reshape(C)
        for x in "wavg":
            src = "a" if (x == "v" and i == 0) else x
            e[p + f"time_mix_{x}1.weight"] = sd[a + src + "1"].T
            e[p + f"time_mix_{x}2.weight"] = sd[a + src + "2"].T
        for x in ("k_k", "k_a", "r_k"):
            e[p + f"time_mix_{x}.weight"] = sd[a + x].reshape(C)
        for x in ("receptance", "key", "value", "output"):
            e[p + f"time_mix_{x}.weight"] = sd[a + x + ".weight"]
        e[p + "time_mix_ln.weight"], e[p + "time_mix_ln.bias"] = sd[a + "ln_x.weight"], sd[a + "ln_x.bias"]
        e[p + "channel_mix_lerp_k.weight"] = sd[f + "x_k"].reshape(C)
        e[p + "channel_mix_key.weight"] = sd[f + "key.weight"]
        e[p + "channel_mix_value.weight"] = sd[f + "value.weight"]
    return e


def expected_v6(sd):
    e = {"token_embd.weight": sd["emb.weight"], "token_embd_norm.weight": sd["blocks.0.ln0.weight"],
         "token_embd_norm.bias": sd["blocks.0.ln0.bias"], "output_norm.weight": sd["ln_out.weight"],
         "output_norm.bias": sd["ln_out.bias"], "output.weight": sd["head.weight"]}
    for i in range(L):
        p, a, f = f"blk.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for n, norm in (("1", "attn_norm"), ("2", "attn_norm_2")):
            for part in ("weight", "bias"):
                e[p + f"{norm}.{part}"] = sd[f"blocks.{i}.ln{n}.{part}"]
        e[p + "time_mix_lerp_x.weight"] = sd[a + "time_maa_x"].reshape(C)
        e[p + "time_mix_lerp_fused.weight"] = torch.stack([sd[a + "time_maa_" + c].reshape(C) for c in "wkvrg"])
        e[p + "time_mix_w1.weight"] = sd[a + "time_maa_w1"].T
        e[p + "time_mix_w2.weight"] = sd[a + "time_maa_w2"].permute(0, 2, 1)
        e[p + "time_mix_decay.weight"] = sd[a + "time_decay"].reshape(C)
        e[p + "time_mix_decay_w1.weight"] = sd[a + "time_decay_w1"].T
        e[p + "time_mix_decay_w2.weight"] = sd[a + "time_decay_w2"].T
        e[p + "time_mix_first.weight"] = sd[a + "time_faaaa"]
        for x in ("receptance", "key", "value", "output", "gate"):
            e[p + f"time_mix_{x}.weight"] = sd[a + x + ".weight"]
        e[p + "time_mix_ln.weight"], e[p + "time_mix_ln.bias"] = sd[a + "ln_x.weight"], sd[a + "ln_x.bias"]
        e[p + "channel_mix_lerp_k.weight"] = sd[f + "time_maa_k"].reshape(C)
        e[p + "channel_mix_lerp_r.weight"] = sd[f + "time_maa_r"].reshape(C)
        for x in ("key", "value", "receptance"):
            e[p + f"channel_mix_{x}.weight"] = sd[f + x + ".weight"]
    return e


F32_ALWAYS = ("time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1", "time_mix_decay_w2",
              "time_mix_lerp_fused")


def expected_type(name, ne, dtype):
    """llama.cpp's converter: vectors, norms, biases and the small decay/mix maps stay f32; q8_0 needs rows of 32."""
    if sum(n > 1 for n in ne) <= 1 or name.endswith(("_norm.weight", ".bias")) or name.split(".")[-2] in F32_ALWAYS:
        return "F32"
    if dtype == "q8_0" and ne[0] % 32:
        return "F16"
    return dtype.upper()


# ---- tests --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["7", "6"])
def test_every_tensor_the_loader_requires_with_exact_f32_values(version, v7, v6, tmp_path):
    src = v7 if version == "7" else v6
    reader = _export(src, tmp_path / "m.gguf", "--dtype", "f32")
    sd = torch.load(src, weights_only=True)
    F = sd["blocks.0.ffn.key.weight"].shape[0]
    if version == "7":
        req, want = loader_v7(F, 32, 32, DV, 32), expected_v7(sd)
    else:
        req, want = loader_v6(F, 32, 64), expected_v6(sd)
    got = _tensors(reader)
    assert set(got) == set(req)  # every tensor the loader creates, and nothing else
    assert set(want) == set(req)
    for name, ne in req.items():
        t = got[name]
        assert _ne(t) == _pad(ne), name
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(np.asarray(t.data).reshape(-1), want[name].contiguous().numpy().reshape(-1)), name


def test_rwkv7_metadata_and_world_tokenizer(v7, tmp_path):
    reader = _export(v7, tmp_path / "m.gguf", "--dtype", "q8_0")
    want = {"general.architecture": "rwkv7", "general.type": "model", "general.file_type": 7,
            "general.quantization_version": 2, "rwkv7.context_length": 1048576, "rwkv7.embedding_length": C,
            "rwkv7.block_count": L, "rwkv7.feed_forward_length": 4 * C, "rwkv7.wkv.head_size": 64,
            "rwkv7.attention.head_count": 0, "rwkv7.attention.decay_lora_rank": 32,
            "rwkv7.attention.iclr_lora_rank": 32, "rwkv7.attention.value_residual_mix_lora_rank": DV,
            "rwkv7.attention.gate_lora_rank": 32, "tokenizer.ggml.model": "rwkv",
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 261}
    for key, value in want.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "rwkv7.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert "rwkv-world" in _field(reader, "tokenizer.chat_template")  # what llama.cpp's template detection keys on
    # the token list as llama.cpp's converter builds it from the vocabulary file
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == V
    assert (tokens[0], types[0]) == (b"<s>", 3)
    with open(DEFAULT_VOCAB_FILE, encoding="utf-8") as f:
        for line in f:
            first, last = line.index(" "), line.rindex(" ")
            idx, tok = int(line[:first]), ast.literal_eval(line[first + 1:last])
            tok = tok.encode() if isinstance(tok, str) else tok
            assert tokens[idx] == repr(tok)[2:-1].encode(), idx
            assert types[idx] == 1
    assert tokens[261] == b"\\n\\n" and tokens[33] == b" "
    assert tokens[65530:] == [f"[PAD{i}]".encode() for i in range(65530, V)] and set(types[65530:]) == {5}


def test_rwkv6_metadata(v6, tmp_path):
    reader = _export(v6, tmp_path / "m.gguf")
    want = {"general.architecture": "rwkv6", "general.file_type": 1, "rwkv6.context_length": 1048576,
            "rwkv6.embedding_length": C, "rwkv6.block_count": L, "rwkv6.feed_forward_length": 224,
            "rwkv6.wkv.head_size": 64, "rwkv6.attention.head_count": 0, "rwkv6.time_mix_extra_dim": 32,
            "rwkv6.time_decay_extra_dim": 64, "rwkv6.rescale_every_n_layers": 0, "tokenizer.ggml.model": "rwkv"}
    for key, value in want.items():
        assert _field(reader, key) == value, key
    # default type: f16 for an fp32 checkpoint (llama.cpp's guess)
    assert _tensors(reader)["blk.0.time_mix_key.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("dtype", ["q8_0", "bf16", "f16"])
def test_types_follow_llama_cpp_rules_and_round_within_tolerance(dtype, v7, tmp_path):
    reader = _export(v7, tmp_path / "m.gguf", "--dtype", dtype)
    want = expected_v7(torch.load(v7, weights_only=True))
    quantized = 0
    for name, t in _tensors(reader).items():
        assert t.tensor_type.name == expected_type(name, _ne(t), dtype), name
        ref = want[name].contiguous().to(torch.float32)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(ref.shape)
        if t.tensor_type.name == "F32":
            assert torch.equal(got, ref), name
        elif t.tensor_type.name == "BF16":
            assert torch.equal(got, ref.to(torch.bfloat16).float()), name
        elif t.tensor_type.name == "F16":
            assert torch.equal(got, ref.to(torch.float16).float()), name
        else:  # q8_0: 32-value blocks, one f16 scale each: error about half a step of the block's scale
            blocks = ref.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            err = (got.reshape(-1, 32) - blocks).abs()
            assert (err <= step * 0.6).all() and err.max() > 0, name
            quantized += 1
    # q8_0: per layer a1 a2 v1 g1 g2 + 4 time-mix + 2 channel-mix matrices (+ layer 0's v2), emb, head
    assert quantized == (25 if dtype == "q8_0" else 0)
    if dtype == "q8_0":  # rows of 16 values (the value-mix rank) do not split into q8_0 blocks: f16
        assert _tensors(reader)["blk.1.time_mix_v2.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_adapter_is_merged_on_export(v7, tmp_path, capsys):
    from rwkv_peft.merge import merge_adapters
    from rwkv_peft.methods import apply_lora, load_base_model, save_adapter
    torch.manual_seed(0)
    model = apply_lora(load_base_model(v7, dtype="float32"), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter")
    reader = _export(tmp_path / "adapter", tmp_path / "merged.gguf", "--dtype", "f32")
    assert "merged" in capsys.readouterr().out
    merged = merge_adapters(v7, [tmp_path / "adapter"]).state_dict()
    base = load_base_model(v7, dtype="float32").state_dict()
    got = _tensors(reader)
    changed = 0
    for i in range(L):
        for ours, name in (("att.key.weight", "time_mix_key"), ("att.value.weight", "time_mix_value"),
                           ("att.receptance.weight", "time_mix_receptance"), ("att.output.weight", "time_mix_output"),
                           ("ffn.key.weight", "channel_mix_key"), ("ffn.value.weight", "channel_mix_value")):
            data = torch.from_numpy(np.asarray(got[f"blk.{i}.{name}.weight"].data).copy())
            assert torch.equal(data, merged[f"model.blocks.{i}.{ours}"]), (i, name)
            changed += not torch.equal(data, base[f"model.blocks.{i}.{ours}"])
    assert changed >= 2 * L  # the LoRA reached the file
    assert _field(reader, "general.name") == "adapter"


def test_refusals_name_the_problem_and_leave_no_file(v7, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    cases = []
    torch.save(make_blinkdl_v5(V, C, L), tmp_path / "v5.pth")
    cases.append(([str(tmp_path / "v5.pth"), str(out)], "rwkv5"))
    torch.save(make_blinkdl_v7(97, C, L), tmp_path / "small.pth")
    cases.append(([str(tmp_path / "small.pth"), str(out)], "vocab_size 97"))
    torch.save(_v7_sd(time_state=True), tmp_path / "state.pth")
    cases.append(([str(tmp_path / "state.pth"), str(out)], "'blocks.0.att.time_state'"))
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(1, 64, 64) for i in range(L)}, tmp_path / "rt.pth")
    cases.append(([str(tmp_path / "rt.pth"), str(out)], "a GGUF holds a model, not a state"))
    cases.append(([str(v7), str(out), "--what", "state"], "a GGUF holds a model, not a state"))
    cases.append(([str(v7), str(tmp_path / "m.pth"), "--dtype", "q8_0"], "q8_0 is a GGUF type"))
    convert(v7, tmp_path / "hf")
    cfg = tmp_path / "hf" / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    cases.append(([str(tmp_path / "hf"), str(out)], "tokenizer_class 'GPT2Tokenizer'"))
    for args, message in cases:
        capsys.readouterr()
        assert main(["export", *args]) == 2, args
        assert message in capsys.readouterr().err, (args, message)
    assert out.read_bytes() == b"previous"  # the old file is untouched, no temporary files are left
    assert not (tmp_path / "m.pth").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_hf_folder_source_with_its_world_tokenizer(v7, tmp_path):
    convert(v7, tmp_path / "hf", dtype="bfloat16")
    reader = _export(tmp_path / "hf", tmp_path / "m.gguf")
    assert _field(reader, "general.file_type") == 32  # bf16 weights -> bf16, as llama.cpp guesses
    assert _tensors(reader)["output.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert _field(reader, "tokenizer.ggml.tokens")[261] == b"\\n\\n"


# ---- the file read the way llama.cpp's graph reads it --------------------------------------------------------

def _weights(reader):
    """{name: fp32 tensor in numpy order (ggml's ne reversed)}."""
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            .reshape(tuple(reversed(_ne(t)))).squeeze() for t in reader.tensors}


def _ln(x, w, b, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps)


def llama_rwkv7_logits(reader, tokens, eps=1e-5):
    """A transcription of llama.cpp's rwkv7 graph (build_rwkv7_time_mix / channel_mix, one token at a time, state
    S[h, value, key] as ggml_rwkv_wkv7 keeps it); ggml_mul_mat(W, x) is ``W @ x`` for W stored [out, in]."""
    W = _weights(reader)
    n_layer, N = _field(reader, "rwkv7.block_count"), _field(reader, "rwkv7.wkv.head_size")
    H = C // N
    shift = [[torch.zeros(C), torch.zeros(C)] for _ in range(n_layer)]
    S = [torch.zeros(H, N, N) for _ in range(n_layer)]
    out = []
    for tok in tokens:
        x = _ln(W["token_embd.weight"][tok], W["token_embd_norm.weight"], W["token_embd_norm.bias"], eps)
        v_first = None
        for i in range(n_layer):
            p = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
            xa_ = _ln(x, p("attn_norm"), W[f"blk.{i}.attn_norm.bias"], eps)
            mixed = (shift[i][0] - xa_) * W[f"blk.{i}.time_mix_lerp_fused.weight"].reshape(6, C) + xa_
            shift[i][0] = xa_
            xr, xw, xk, xv, xa, xg = mixed
            r, k, v = p("time_mix_receptance") @ xr, p("time_mix_key") @ xk, p("time_mix_value") @ xv
            w = torch.exp(-0.606531 * torch.sigmoid(p("time_mix_w2") @ torch.tanh(p("time_mix_w1") @ xw)
                                                    + p("time_mix_w0")))
            if v_first is None:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(p("time_mix_v2") @ (p("time_mix_v1") @ xv) + p("time_mix_v0"))
            g = p("time_mix_g2") @ torch.sigmoid(p("time_mix_g1") @ xg)
            a = torch.sigmoid(p("time_mix_a2") @ (p("time_mix_a1") @ xa) + p("time_mix_a0"))
            kk = torch.nn.functional.normalize((k * p("time_mix_k_k")).reshape(H, N), dim=-1, eps=1e-12)
            ka = k * p("time_mix_k_a")
            k = k + (a * ka - ka)
            rh, wh, kh, vh, ah = (t.reshape(H, N) for t in (r, w, k, v, a))
            sa = torch.einsum("hij,hj->hi", S[i], -kk)
            S[i] = S[i] * wh[:, None, :] + vh[:, :, None] * kh[:, None, :] + sa[:, :, None] * (kk * ah)[:, None, :]
            y = torch.einsum("hij,hj->hi", S[i], rh)
            y = _ln(y, None, None, 64e-5).reshape(C) * p("time_mix_ln") + W[f"blk.{i}.time_mix_ln.bias"]
            y = y + (vh * (kh * rh * p("time_mix_r_k").reshape(H, N)).sum(-1, keepdim=True)).reshape(C)
            x = x + p("time_mix_output") @ (y * g)
            xf = _ln(x, p("attn_norm_2"), W[f"blk.{i}.attn_norm_2.bias"], eps)
            xk = (shift[i][1] - xf) * p("channel_mix_lerp_k") + xf
            shift[i][1] = xf
            x = x + p("channel_mix_value") @ torch.relu(p("channel_mix_key") @ xk) ** 2
        out.append(W["output.weight"] @ _ln(x, W["output_norm.weight"], W["output_norm.bias"], eps))
    return torch.stack(out)


def llama_rwkv6_logits(reader, tokens, eps=1e-5):
    """A transcription of llama.cpp's rwkv6 graph (build_rwkv6_time_mix / channel_mix; ggml_rwkv_wkv6 keeps
    S[h, key, value])."""
    W = _weights(reader)
    n_layer, N = _field(reader, "rwkv6.block_count"), _field(reader, "rwkv6.wkv.head_size")
    H = C // N
    shift = [[torch.zeros(C), torch.zeros(C)] for _ in range(n_layer)]
    S = [torch.zeros(H, N, N) for _ in range(n_layer)]
    out = []
    for tok in tokens:
        x = _ln(W["token_embd.weight"][tok], W["token_embd_norm.weight"], W["token_embd_norm.bias"], eps)
        for i in range(n_layer):
            p = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
            xa_ = _ln(x, p("attn_norm"), W[f"blk.{i}.attn_norm.bias"], eps)
            sx = shift[i][0] - xa_
            shift[i][0] = xa_
            xxx = torch.tanh(p("time_mix_w1") @ (sx * p("time_mix_lerp_x") + xa_)).reshape(5, -1)
            xxx = torch.einsum("ncd,nd->nc", p("time_mix_w2"), xxx)      # w2 stored [5, C, D]
            xw, xk, xv, xr, xg = (xxx + p("time_mix_lerp_fused").reshape(5, C)) * sx + xa_
            r, k, v = p("time_mix_receptance") @ xr, p("time_mix_key") @ xk, p("time_mix_value") @ xv
            g = torch.nn.functional.silu(p("time_mix_gate") @ xg)
            w = p("time_mix_decay_w2") @ torch.tanh(p("time_mix_decay_w1") @ xw) + p("time_mix_decay")
            w = torch.exp(-torch.exp(w)).reshape(H, N)
            rh, kh, vh, u = r.reshape(H, N), k.reshape(H, N), v.reshape(H, N), p("time_mix_first").reshape(H, N)
            kv = kh[:, :, None] * vh[:, None, :]
            y = torch.einsum("hi,hij->hj", rh, u[:, :, None] * kv + S[i])
            S[i] = S[i] * w[:, :, None] + kv
            y = _ln(y, None, None, 64e-5).reshape(C) * p("time_mix_ln") + W[f"blk.{i}.time_mix_ln.bias"]
            x = x + p("time_mix_output") @ (y * g)
            xf = _ln(x, p("attn_norm_2"), W[f"blk.{i}.attn_norm_2.bias"], eps)
            sf = shift[i][1] - xf
            shift[i][1] = xf
            rr = torch.sigmoid(p("channel_mix_receptance") @ (sf * p("channel_mix_lerp_r") + xf))
            kf = torch.relu(p("channel_mix_key") @ (sf * p("channel_mix_lerp_k") + xf)) ** 2
            x = x + rr * (p("channel_mix_value") @ kf)
        out.append(W["output.weight"] @ _ln(x, W["output_norm.weight"], W["output_norm.bias"], eps))
    return torch.stack(out)


@pytest.mark.parametrize("version", ["7", "6"])
def test_llama_cpp_graph_on_the_file_gives_our_logits(version, v7, v6, tmp_path):
    from rwkv_peft.methods import load_base_model
    src = v7 if version == "7" else v6
    reader = _export(src, tmp_path / "m.gguf", "--dtype", "f32")
    tokens = [0, 261, 33, 65529, 1000, 7, 7, 42]
    with torch.no_grad():
        ours = load_base_model(src, dtype="float32").eval()(input_ids=torch.tensor([tokens])).logits[0].float()
        theirs = (llama_rwkv7_logits if version == "7" else llama_rwkv6_logits)(reader, tokens)
    err = float((theirs - ours).abs().max() / ours.abs().max())
    assert err <= 1e-5, err


def test_check_script_says_when_llama_cpp_python_is_missing(tmp_path):
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: run scripts/check_gguf.py for real")
    proc = subprocess.run([sys.executable, "scripts/check_gguf.py", "m.pth", "m.gguf"], capture_output=True,
                          text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]), timeout=120)
    assert proc.returncode == 2
    assert "llama-cpp-python is not importable" in proc.stderr and "nothing was compared" in proc.stderr


def test_the_gguf_chat_template_writes_what_our_tokenizer_template_writes():
    """The template in the file (which llama.cpp's chat and llama-cpp-python render) gives the same prompt as the
    training template (rwkv_peft/tokenization/chat_templates.py), for a system turn, several turns and the
    generation prompt. (llama-cpp-python 0.3.36's Jinja2ChatFormatter rendered this file's template identically,
    checked by hand: docs/deploy.md.)"""
    from transformers.utils.chat_template_utils import render_jinja_template

    from rwkv_peft.export_gguf import CHAT_TEMPLATE
    from rwkv_peft.tokenization.chat_templates import CHAT_TEMPLATES
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"}]
    for prompt in (True, False):
        ours = render_jinja_template([msgs], chat_template=CHAT_TEMPLATES["rwkv"], add_generation_prompt=prompt)[0]
        gguf = render_jinja_template([msgs], chat_template=CHAT_TEMPLATE, add_generation_prompt=prompt)[0]
        assert gguf == ours
