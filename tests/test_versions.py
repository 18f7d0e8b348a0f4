"""The version registry: every RWKV generation reached through rwkv_peft.versions, and the one error root."""
import inspect

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rwkv_peft
from rwkv_peft import errors, versions
from rwkv_peft.convert import causal_lm_class, load_any, to_blinkdl
from tests.factories import make_blinkdl_v7
from tests.factories_v4 import make_blinkdl_v4
from tests.factories_v5 import make_blinkdl_v5
from tests.factories_v6 import make_blinkdl_v6

FACTORIES = {"rwkv7": make_blinkdl_v7, "rwkv6": make_blinkdl_v6, "rwkv5": make_blinkdl_v5,
             "rwkv4": make_blinkdl_v4}


@pytest.fixture(params=[v.name for v in versions.VERSIONS])
def version_pth(request, tmp_path):
    path = tmp_path / f"{request.param}.pth"
    torch.save(FACTORIES[request.param](61, 128, 2), path)
    return versions.VERSIONS[[v.name for v in versions.VERSIONS].index(request.param)], path


def test_every_version_is_read_registered_and_targeted(version_pth):
    """A .pth of each version is detected, converted both ways losslessly, registered with the Auto classes,
    and every LoRA preset names modules the model has (the never-targeted ones aside)."""
    version, path = version_pth
    config, sd, kind = load_any(path)
    assert kind == "pth" and versions.of(config) is version and isinstance(config, version.config_class)
    assert causal_lm_class(config) is version.causal_lm_class
    assert AutoConfig.for_model(version.model_type).__class__ is version.config_class
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is version.causal_lm_class and versions.of(model) is version
    back = to_blinkdl(sd, config)
    original = torch.load(path, weights_only=True)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    names = [n for n, _ in model.named_modules()]
    for preset, targets in version.lora_presets.items():
        for t in targets:
            assert any(n.endswith("." + t) for n in names), (version.name, preset, t)
    for never in version.never_targeted:
        assert any(n.endswith(never) for n in names)


def test_lora_uses_the_models_version(version_pth):
    from rwkv_peft.methods import apply_lora
    version, path = version_pth
    config, sd, _ = load_any(path)
    model = version.causal_lm_class(config)
    peft_model = apply_lora(model, r=2, targets="all")
    assert set(peft_model.peft_config["default"].target_modules) == set(version.lora_presets["all"])


def test_unsupported_versions_name_what_is_supported(tmp_path):
    sd = {"emb.weight": torch.zeros(61, 8), "blocks.0.att.time_first": torch.zeros(2),  # RWKV-5.1: decay per head
          "blocks.0.att.time_decay": torch.zeros(2), "blocks.0.att.key.weight": torch.zeros(8, 8),
          "blocks.0.att.gate.weight": torch.zeros(8, 8), "blocks.0.att.ln_x.weight": torch.zeros(8)}
    torch.save(sd, tmp_path / "v51.pth")
    with pytest.raises(versions.UnsupportedVersionError, match=r"v51\.pth: RWKV-5\.1 checkpoint; supported: RWKV-7"):
        load_any(tmp_path / "v51.pth")


def test_state_tuning_on_a_version_without_it_is_a_clear_error(tmp_path, monkeypatch):
    """Every version here has it now (tests/methods/test_state_tuning_versions.py); one without it is refused."""
    import dataclasses

    from rwkv_peft.tuners.state_tuning import apply_state_tuning
    config, _, _ = load_any(_saved(tmp_path, make_blinkdl_v6(61, 128, 1)))
    v6 = versions.of(config)
    without = dataclasses.replace(v6, state_tuning=False)
    monkeypatch.setattr(versions, "VERSIONS", tuple(without if v is v6 else v for v in versions.VERSIONS))
    with pytest.raises(errors.RWKVPeftError, match="state tuning is wired in for RWKV-7, RWKV-5.2 so far; this "
                                                   "is a RWKV-6"):
        apply_state_tuning(v6.causal_lm_class(config))


def _saved(tmp_path, sd):
    torch.save(sd, tmp_path / "m.pth")
    return tmp_path / "m.pth"


def test_one_error_root():
    """Every error class the package defines derives from RWKVPeftError, with an exit code of 1 or 2."""
    import rwkv_peft.commands._common
    import rwkv_peft.data.formats
    import rwkv_peft.export
    import rwkv_peft.merge
    import rwkv_peft.ops._cuda_build
    import rwkv_peft.paths
    import rwkv_peft.training
    import rwkv_peft.tuners.state_tuning
    seen = set()
    for module in (rwkv_peft.commands._common, rwkv_peft.data, rwkv_peft.data.formats, rwkv_peft.export,
                   rwkv_peft.merge, rwkv_peft.ops._cuda_build, rwkv_peft.paths, rwkv_peft.training,
                   rwkv_peft.tuners.state_tuning, rwkv_peft.methods, rwkv_peft.recipe, versions,
                   rwkv_peft.models.generation):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__.startswith("rwkv_peft") and cls.__name__.endswith(
                    ("Error", "Diverged")):
                seen.add(cls)
                assert issubclass(cls, errors.RWKVPeftError), cls
                assert cls.exit_code in (1, 2), cls
    assert len(seen) >= 14
    assert rwkv_peft.training.TrainingDiverged.exit_code == 1
