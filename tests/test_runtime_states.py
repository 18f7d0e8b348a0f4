"""State files for inference runtimes (``rwkv_peft.runtime_states``), per version with a learned state (RWKV-7,
RWKV-6, RWKV-5.2): each file is read back with a minimal re-implementation of the runtime's own loader, and what
the runtime ends up with must mean what our state means:

- RWKV-Runner ``.pth``: its state list, fed to our model as the carried state, gives the state-tuned model's
  logits;
- Ai00 ``.state``: web-rwkv's state buffer, run through the recurrence as web-rwkv's shaders compute it, gives our
  WKV op's outputs from our state; and the buffer as our carried state gives the tuned model's logits (fp16).
"""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rwkv_peft import versions
from rwkv_peft.cli import main
from rwkv_peft.methods import apply_state_tuning, load_base_model, save_adapter
from rwkv_peft.ops.wkv5 import wkv5_recurrent
from rwkv_peft.ops.wkv6 import wkv6_recurrent
from rwkv_peft.ops.wkv7 import wkv7_recurrent
from rwkv_peft.runtime_states import RuntimeStateError, export_runtime_state, read_runtime_state
from rwkv_peft.tuners.state_tuning import STATE_FILE, get_states, save_state_file
from tests.factories import make_blinkdl_v7, rel_err
from tests.factories_v5 import make_blinkdl_v5
from tests.factories_v6 import make_blinkdl_v6

VOCAB, WIDTH, LAYERS, HEADS, N = 97, 128, 2, 2, 64
FACTORIES = {"rwkv7": make_blinkdl_v7, "rwkv6": make_blinkdl_v6, "rwkv5": make_blinkdl_v5}
WIRED = [v.name for v in versions.VERSIONS if v.runtime_state_files]


# ---- the runtimes' loaders, re-implemented from their sources --------------------------------------------------

def runner_load_state(path, n_layer: int, n_embd: int, version: float):
    """RWKV-Runner's ``load_rwkv_state`` (josStorer/RWKV-Runner, backend-python/utils/rwkv.py): ``torch.load``,
    the shape check against the model, then per layer ``[zeros(C), time_state (transposed below v7), zeros(C)]``
    as the official package's state list."""
    state_raw = torch.load(path, map_location="cpu")
    shape = next(iter(state_raw.values())).shape
    if len(state_raw) != n_layer or shape[0] * shape[1] != n_embd:
        raise ValueError("state shape mismatch")
    state = []
    for i in range(n_layer):
        s = state_raw[f"blocks.{i}.att.time_state"]
        wkv = s if version >= 7 else s.transpose(1, 2)
        state += [torch.zeros(n_embd), wkv.to(dtype=torch.float).contiguous(), torch.zeros(n_embd)]
    return state


def web_rwkv_read_state(path, num_layer: int, num_emb: int, num_head: int) -> torch.Tensor:
    """web-rwkv's ``read_state`` (cryscan/web-rwkv src/runtime/v5.rs, v6.rs, v7.rs; Ai00-X/ai00_server
    crates/ai00-core/src/lib.rs ``load_model_state`` hands it the file as safetensors): per layer
    ``load_matrix_f16`` (src/runtime/loader.rs: the dtype must be F16, the shape is read reversed,
    ``Shape::from_slice_rev``), ``TensorOp::transpose`` (src/tensor/ops.rs + shaders/reshape.wgsl: swaps the 2nd
    and 3rd axes, output shape must be [head_size, num_head, head_size]), reshaped to [num_emb, head_size] and
    blitted into columns 1..head_size of the layer's [num_emb, head_size + 2] buffer (column 0: the time mix's
    token shift, column head_size + 1: the channel mix's, both zeros). Returned as a torch tensor
    ``[num_layer, head_size + 2, num_emb]`` (web-rwkv's x axis last)."""
    head_size = num_emb // num_head
    data = torch.zeros(num_layer, head_size + 2, num_emb)
    with safe_open(str(path), framework="pt") as f:
        for layer in range(num_layer):
            t = f.get_tensor(f"blocks.{layer}.att.time_state")
            if t.dtype != torch.float16:  # TensorCpu::<f16>::from_reader: T::DATA_TYPE != dt -> TensorErrorKind::Type
                raise TypeError(f"layer {layer}: dtype {t.dtype}, web-rwkv loads F16 only")
            x, y, z = reversed(t.shape)  # web-rwkv's [x, y, z] with x fastest = torch [z, y, x]
            if [x, z, y] != [head_size, num_head, head_size]:
                raise ValueError(f"layer {layer}: transpose output shape {[x, z, y]} != state tensor's")
            out = t.permute(1, 0, 2)  # out[x, z, y] = in[x, y, z]: torch out[y_in, z_in, x] = t[z_in, y_in, x]
            data[layer, 1:head_size + 1] = out.reshape(head_size, num_emb).float()
    return data


def shader_rows(buffer_layer: torch.Tensor, num_head: int) -> torch.Tensor:
    """The WKV state of one layer as the time-mix shaders index it: ``S[h, j, i] = buffer[1 + j, h * N + i]``;
    (shaders/time_mix_v7.wgsl / time_mix_v6.wgsl / time_mix_v5.wgsl: row ``j`` goes with ``r_j, k_j, w_j``,
    the thread's column ``i`` with ``v_i`` and the output ``y_i``)."""
    n = (buffer_layer.shape[0] - 2)
    return buffer_layer[1:n + 1].reshape(n, num_head, n).permute(1, 0, 2)


def shader_v7_step(S, r, w, k, v, a, b):
    """One token of time_mix_v7.wgsl on ``S[h, j, i]`` (w: the decay factor, as after ``act_w``)."""
    sa = (S * a[:, :, None]).sum(1)                                          # sa_i = sum_j S[j][i] a_j
    S = S * w[:, :, None] + k[:, :, None] * v[:, None, :] + b[:, :, None] * sa[:, None, :]
    return (r[:, :, None] * S).sum(1), S                                     # y_i = sum_j r_j S[j][i]


def shader_v6_step(S, r, w, k, v, u):
    """One token of time_mix_v6.wgsl / time_mix_v5.wgsl on ``S[h, j, i]`` (w: the decay factor)."""
    kv = k[:, :, None] * v[:, None, :]
    y = (r[:, :, None] * (u[:, :, None] * kv + S)).sum(1)
    return y, w[:, :, None] * S + kv


# ---- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=WIRED)
def tuned(request, tmp_path_factory):
    """(version, base path, state-tuned model with random states, its adapter folder)."""
    d = tmp_path_factory.mktemp(request.param)
    torch.save(FACTORIES[request.param](VOCAB, WIDTH, LAYERS, seed=4), d / "base.pth")
    model = apply_state_tuning(load_base_model(d / "base.pth", dtype="float32"))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in model.model.blocks:
            m.att.time_state.copy_(torch.randn(m.att.time_state.shape, generator=g) * 0.7)
    save_adapter(model, d / "adapter")
    return versions.by_name(request.param), d / "base.pth", model, d / "adapter"


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(model, ids, state=None):
    return model(input_ids=ids, state=state).logits.float()


# ---- RWKV-Runner ---------------------------------------------------------------------------------------------

def test_runner_pth_loads_as_runner_loads_it(tuned, probe, tmp_path, capsys):
    version, base, model, adapter = tuned
    assert main(["export", str(adapter), str(tmp_path / "s.pth"), "--format", "runner"]) == 0
    assert "RWKV-Runner state file" in capsys.readouterr().out
    raw = torch.load(tmp_path / "s.pth", weights_only=True)
    assert sorted(raw) == [f"blocks.{i}.att.time_state" for i in range(LAYERS)]
    assert all(t.dtype == torch.float32 and tuple(t.shape) == (HEADS, N, N) for t in raw.values())
    # the plain .pth export writes the same tensors (the RWKV-Runner file is the runtime .pth)
    assert main(["export", str(adapter), str(tmp_path / "plain.pth")]) == 0
    plain = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert all(torch.equal(plain[k], raw[k]) for k in raw)

    runner = runner_load_state(tmp_path / "s.pth", LAYERS, WIDTH, float(version.blinkdl))
    carried = [(runner[3 * i][None], runner[3 * i + 1][None], runner[3 * i + 2][None]) for i in range(LAYERS)]
    plain_base = load_base_model(base, dtype="float32")  # no learned state: everything comes from the file
    assert rel_err(_logits(plain_base, probe, carried), _logits(model, probe)) <= 1e-5
    assert rel_err(_logits(plain_base, probe), _logits(model, probe)) > 1e-2  # the state matters

    with pytest.raises(ValueError, match="state shape mismatch"):  # Runner refuses another model's sizes
        runner_load_state(tmp_path / "s.pth", LAYERS + 1, WIDTH, float(version.blinkdl))


# ---- Ai00 ----------------------------------------------------------------------------------------------------

def test_ai00_state_loads_as_web_rwkv_loads_it(tuned, probe, tmp_path, capsys):
    version, base, model, adapter = tuned
    assert main(["export", str(adapter), str(tmp_path / "persona.state")]) == 0  # .state: Ai00 by its suffix
    out = capsys.readouterr().out
    assert "Ai00 (web-rwkv) state file" in out and "float16" in out and version.title in out
    with safe_open(str(tmp_path / "persona.state"), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == [f"blocks.{i}.att.time_state" for i in range(LAYERS)]
    assert meta["format"] == "pt" and meta["architecture"] == version.name  # what Ai00's converter writes, + ours
    assert not any("/" in v for v in meta.values())  # no paths in a file that gets shared

    buf = web_rwkv_read_state(tmp_path / "persona.state", LAYERS, WIDTH, HEADS)
    assert torch.all(buf[:, 0] == 0) and torch.all(buf[:, N + 1] == 0)  # token shifts start from zeros
    ours = get_states(model)
    g = torch.Generator().manual_seed(1)
    T = 3
    for layer in range(LAYERS):
        S_shader = shader_rows(buf[layer], HEADS)  # what the shaders run on
        S_op = version.file_to_runtime_state(version.state_to_file(ours[layer]))  # what our WKV op runs on
        r, k, v = (torch.randn(T, HEADS, N, generator=g) for _ in range(3))
        w = -torch.rand(T, HEADS, N, generator=g) * 2 - 0.05  # log decay
        ys = []
        if version.name == "rwkv7":
            kk = torch.nn.functional.normalize(torch.randn(T, HEADS, N, generator=g), dim=-1)
            a, b = -kk, kk * torch.rand(T, HEADS, N, generator=g)
            S = S_shader
            for t in range(T):
                y, S = shader_v7_step(S, r[t], w[t].exp(), k[t], v[t], a[t], b[t])
                ys.append(y)
            want, _ = wkv7_recurrent(*(x[None] for x in (r, w, k, v, a, b)), initial_state=S_op)
        else:
            u = torch.randn(HEADS, N, generator=g) * 0.5
            if version.name == "rwkv5":
                w = w[:1].expand(T, HEADS, N)  # RWKV-5.2's decay does not depend on the token
            S = S_shader
            for t in range(T):
                y, S = shader_v6_step(S, r[t], w[t].exp(), k[t], v[t], u)
                ys.append(y)
            if version.name == "rwkv6":
                want, _ = wkv6_recurrent(r[None], w[None], k[None], v[None], u, initial_state=S_op)
            else:
                want, _ = wkv5_recurrent(r[None], w[0], k[None], v[None], u, initial_state=S_op)
        assert rel_err(torch.stack(ys)[None], want) <= 2e-3, (version.name, layer)  # fp16 file

    # the buffer as our carried state (its layout: the WKV op's) gives the tuned model's logits
    carried = []
    for layer in range(LAYERS):
        S = shader_rows(buf[layer], HEADS)  # [h, key, value]
        S = S if version.runtime_state_layout == versions.KEY_VALUE else S.transpose(-1, -2)
        carried.append((buf[layer, 0][None], S[None].contiguous(), buf[layer, N + 1][None]))
    plain_base = load_base_model(base, dtype="float32")
    assert rel_err(_logits(plain_base, probe, carried), _logits(model, probe)) <= 5e-3

    # read back by us: the states, up to float16 rounding; and on to the other formats
    back, meta = read_runtime_state(tmp_path / "persona.state")
    assert meta["architecture"] == version.name and meta["dtype"] == "float16"
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(back, ours))
    assert main(["export", str(tmp_path / "persona.state"), str(tmp_path / "again.pth")]) == 0
    assert torch.allclose(torch.load(tmp_path / "again.pth", weights_only=True)["blocks.0.att.time_state"],
                          version.state_to_file(ours[0]), atol=2e-3)


# ---- errors and notes ----------------------------------------------------------------------------------------

def test_format_and_suffix_must_agree_and_nothing_is_written(tuned, tmp_path, capsys):
    _, _, _, adapter = tuned
    assert main(["export", str(adapter), str(tmp_path / "s.pth"), "--format", "ai00"]) == 2
    assert "reads its state from a .state file, not a .pth file" in capsys.readouterr().err
    assert main(["export", str(adapter), str(tmp_path / "s.state"), "--format", "runner"]) == 2
    assert "RWKV-Runner reads its state from a .pth file, not a .state file" in capsys.readouterr().err
    assert main(["export", str(adapter), str(tmp_path / "m.pth"), "--format", "ai00", "--what", "model"]) == 2
    assert "--format ai00 is for state files" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_values_float16_cannot_hold_are_refused(tmp_path):
    states = [torch.zeros(HEADS, N, N), torch.zeros(HEADS, N, N)]
    states[1][0, 3, 5] = 1e6
    save_state_file(states, tmp_path / "big.safetensors", architecture="rwkv7")
    with pytest.raises(RuntimeStateError, match=r"layer 1 state holds 1e\+06, beyond float16"):
        export_runtime_state(tmp_path / "big.safetensors", tmp_path / "big.state")
    assert not (tmp_path / "big.state").exists()
    # the runner file is fp32 and takes it
    export_runtime_state(tmp_path / "big.safetensors", tmp_path / "big.pth")
    assert torch.load(tmp_path / "big.pth", weights_only=True)["blocks.1.att.time_state"][0, 3, 5] == 1e6


def test_tensors_a_runtime_file_cannot_carry_are_named(tmp_path):
    """A state adapter with learned token shifts too (full-state tuning): the runtime files carry only the WKV
    states, and the export says what is left out."""
    states = [torch.randn(HEADS, N, N) for _ in range(LAYERS)]
    save_state_file(states, tmp_path / STATE_FILE, architecture="rwkv7")
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(tmp_path / STATE_FILE))
    sd.update({f"blocks.{i}.att.shift_state": torch.randn(WIDTH) for i in range(LAYERS)})
    save_file(sd, str(tmp_path / STATE_FILE), metadata=meta)
    msg = export_runtime_state(tmp_path, tmp_path / "s.state")
    assert "note: Ai00 (web-rwkv) reads only the WKV states: blocks.0.att.shift_state, blocks.1.att.shift_state" \
           in msg
    back, _ = read_runtime_state(tmp_path / "s.state")
    assert len(back) == LAYERS
    # RWKV-Runner counts a .pth's keys as layers: its file holds the WKV states only, and passes its check
    msg = export_runtime_state(tmp_path, tmp_path / "s.pth", "runner")
    assert "note: RWKV-Runner reads only the WKV states" in msg and "counts the file's keys" in msg
    assert len(runner_load_state(tmp_path / "s.pth", LAYERS, WIDTH, 7.0)) == 3 * LAYERS
    torch.save({**torch.load(tmp_path / "s.pth"), "blocks.0.att.shift_state": torch.zeros(WIDTH)},
               tmp_path / "full.pth")  # a runtime .pth that kept a shift state: Runner refuses it ...
    with pytest.raises(ValueError, match="state shape mismatch"):
        runner_load_state(tmp_path / "full.pth", LAYERS, WIDTH, 7.0)
    assert "blocks.0.att.shift_state" in export_runtime_state(tmp_path / "full.pth", tmp_path / "fixed.pth")
    assert len(runner_load_state(tmp_path / "fixed.pth", LAYERS, WIDTH, 7.0)) == 3 * LAYERS  # ... and takes this
