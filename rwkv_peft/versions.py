"""Every RWKV generation this package reads, in one table: what each one is and where its pieces live.

A version is one folder (``rwkv_peft/models/rwkvN/``: configuration, modeling, conversion to and from BlinkDL
``.pth`` keys) and one :class:`Version` entry in :data:`VERSIONS`. Everything else asks this table: checkpoint
detection and conversion (``convert.py``), loading (``methods/loading.py``), LoRA presets (``methods/lora.py``),
adapter manifests (``methods/adapter_io.py``), the Auto-class registration (``__init__.py``), state tuning, and
the runtimes' state files (``runtime_states.py``: RWKV-Runner's ``.pth``, Ai00's ``.state``; :class:`RuntimeStateFile`).

Module names LoRA can target, per block (``model.blocks.N.``): the time-mix projections ``att.receptance``,
``att.key``, ``att.value``, ``att.output`` (RWKV-5/6 also ``att.gate``), the channel mix ``ffn.key``,
``ffn.value`` (RWKV-5/6 also ``ffn.receptance``), and each version's small low-rank maps.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import CheckpointError

# layouts of a layer's WKV state [H, N, N]: S[h, value, key] (RWKV-7's own state; every runtime state file) or
# S[h, key, value] (the RWKV-5/6 state the official package carries)
VALUE_KEY = "[H, N(value), N(key)]"
KEY_VALUE = "[H, N(key), N(value)]"


@dataclass(frozen=True)
class RuntimeStateFile:
    """How one inference runtime reads a learned initial state from its own file (``rwkv_peft.runtime_states``
    writes and reads it). Facts read off each runtime's loader; ``sources`` names the files they come from."""
    name: str                      # what ``rwkv-peft export --format`` takes: "runner"
    runtime: str                   # what users read: "RWKV-Runner"
    suffix: str                    # the file name's suffix the runtime lists: ".pth"
    container: str                 # "torch" (``torch.save`` of a dict of tensors) or "safetensors"
    key: str = "blocks.{layer}.att.time_state"   # one tensor per layer, [H, N, N]
    layout: str = VALUE_KEY        # the tensor's axes
    dtype: str = "float32"         # the only dtype the runtime accepts ("float16": web-rwkv's load_matrix_f16)
    token_shift: bool = False      # whether the file carries token-shift vectors (else the runtime uses zeros)
    metadata: Tuple[Tuple[str, str], ...] = ()   # safetensors header metadata the runtime's own converter writes
    sources: str = ""


# RWKV-Runner (backend-python/utils/rwkv.py ``load_rwkv_state``): torch.load of {blocks.N.att.time_state: [H, N, N]};
# v7 used as it is, v5/v6 ``.transpose(1, 2)`` into the official package's state list; token shifts zeros
RUNNER_STATE = RuntimeStateFile(
    "runner", "RWKV-Runner", ".pth", "torch", sources="josStorer/RWKV-Runner backend-python/utils/rwkv.py "
    "(load_rwkv_state), frontend/src/startup.ts (state-models/ listing)")
# Ai00 server (crates/ai00-core/src/lib.rs ``load_runtime``) reads a safetensors file through web-rwkv's
# ``runtime/v{5,6,7}.rs`` ``read_state``: ``load_matrix_f16`` (F16 only), then a transpose into web-rwkv's state
# buffer, whose rows are the key and columns the value (``shaders/time_mix_v7.wgsl``): the file is S[h, key, value]
# for every version; Ai00's converter (assets/scripts/convert_safetensors.py) transposes ``time_state`` the same way
AI00_STATE = RuntimeStateFile(
    "ai00", "Ai00 (web-rwkv)", ".state", "safetensors", layout=KEY_VALUE, dtype="float16",
    metadata=(("format", "pt"),), sources="Ai00-X/ai00_server crates/ai00-core/src/lib.rs (load_runtime, "
    "load_model_state), assets/scripts/convert_safetensors.py; cryscan/web-rwkv src/runtime/v5.rs, v6.rs, v7.rs "
    "(read_state), src/runtime/loader.rs (load_matrix_f16), src/shaders/time_mix_v7.wgsl / time_mix_v6.wgsl")
RUNTIME_STATE_FILES: Tuple[RuntimeStateFile, ...] = (RUNNER_STATE, AI00_STATE)

_ATTENTION = ("att.receptance", "att.key", "att.value", "att.output")
_FFN = ("ffn.key", "ffn.value")


def _presets(attention, ffn, low_rank=()) -> Dict[str, List[str]]:
    return {"default": [*attention, *ffn], "attention": list(attention), "ffn": list(ffn),
            "all": [*attention, *ffn, *low_rank]}


@dataclass(frozen=True)
class Version:
    """One RWKV generation. ``package`` holds ``configuration_<name>``, ``modeling_<name>`` (``<Prefix>Config``,
    ``<Prefix>Model``, ``<Prefix>ForCausalLM``) and ``convert_<name>`` (``blinkdl_to_hf(sd, where)``,
    ``hf_to_blinkdl(sd, config)``)."""
    name: str                      # our name, in adapter manifests: "rwkv7"
    title: str                     # what users read: "RWKV-7"
    blinkdl: str                   # what ``detect_blinkdl_version`` says of its .pth: "7", "6", "5.2"
    prefix: str                    # class name prefix: "RWKV7"
    lora_presets: Dict[str, List[str]]
    # modules no adapter goes on: RWKV-7's layer 0 takes its value residual from itself, so its v_lora never
    # reaches the loss (an adapter there would never train, and its missing gradient stalls DDP's all-reduce)
    never_targeted: Tuple[str, ...] = ()
    # State tuning: every layer's learned initial WKV state, the parameter ``att.time_state`` [H, N, N].
    state_tuning: bool = False     # whether state tuning (the learned initial WKV state) is wired in
    state_layout: str = VALUE_KEY  # our ``att.time_state`` parameter (and our state_adapter.safetensors)
    # the runtime state file: one tensor per layer under this key, in this layout (RWKV-PEFT's training kernels,
    # RWKV-Runner and the official package's merged-checkpoint path all read S[h, value, key] for v5, v6 and v7)
    state_file_key: str = "blocks.{layer}.att.time_state"
    state_file_layout: str = VALUE_KEY
    # the WKV state in the official package's state list (``state[3 * layer + 1]``, what ``forward`` carries);
    # a runtime building that list from the state file transposes where the two layouts differ
    runtime_state_layout: str = VALUE_KEY
    # whether the official package starts every sequence from a ``time_state`` stored in the checkpoint itself
    # (v5/v6: ``RWKV.forward`` with ``state=None``); otherwise the runtime passes the state in
    runtime_reads_checkpoint_state: bool = False
    # the state files inference runtimes load for this version (``rwkv-peft export --format NAME``)
    runtime_state_files: Tuple[RuntimeStateFile, ...] = ()
    notes: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_type(self) -> str:
        return f"{self.name}_peft"

    @property
    def package(self) -> str:
        return f"rwkv_peft.models.{self.name}"

    def _get(self, module: str, attr: str):
        key = (module, attr)
        if key not in self._cache:
            self._cache[key] = getattr(importlib.import_module(f"{self.package}.{module}_{self.name}"), attr)
        return self._cache[key]

    @property
    def config_class(self):
        return self._get("configuration", f"{self.prefix}Config")

    @property
    def model_class(self):
        return self._get("modeling", f"{self.prefix}Model")

    @property
    def causal_lm_class(self):
        return self._get("modeling", f"{self.prefix}ForCausalLM")

    @property
    def time_mix_class(self):
        return self._get("modeling", f"{self.prefix}TimeMix")

    def state_key(self, layer: int) -> str:
        """The runtime state file's key of one layer: ``blocks.{layer}.att.time_state``."""
        return self.state_file_key.format(layer=layer)

    @staticmethod
    def _relayout(s, src: str, dst: str):
        return s if src == dst else s.transpose(-1, -2)

    def state_to_file(self, s):
        """Our ``att.time_state`` [H, N, N] -> the runtime state file's tensor."""
        return self._relayout(s, self.state_layout, self.state_file_layout)

    def state_from_file(self, s):
        """The runtime state file's tensor -> our ``att.time_state``."""
        return self._relayout(s, self.state_file_layout, self.state_layout)

    def state_to_op(self, s):
        """Our ``att.time_state`` -> the layout the model's WKV op carries (the official package's state list)."""
        return self._relayout(s, self.state_layout, self.runtime_state_layout)

    def file_to_runtime_state(self, s):
        """The runtime state file's tensor -> the WKV state in the official package's state list."""
        return self._relayout(s, self.state_file_layout, self.runtime_state_layout)

    def runtime_state_file(self, name: str) -> RuntimeStateFile:
        """The state file runtime ``name`` ("runner", "ai00") loads for this version; ``ValueError`` naming the
        runtimes this version has when it has none called so."""
        found = next((f for f in self.runtime_state_files if f.name == name), None)
        if found is None:
            have = ", ".join(f.name for f in self.runtime_state_files) or "none (no learned state)"
            raise ValueError(f"{self.title}: no runtime state file format {name!r}; this version has: {have}")
        return found

    def state_to_runtime_file(self, s, fmt: RuntimeStateFile):
        """Our ``att.time_state`` [H, N, N] -> the tensor of runtime file ``fmt`` (before its dtype cast)."""
        return self._relayout(s, self.state_layout, fmt.layout)

    def state_from_runtime_file(self, s, fmt: RuntimeStateFile):
        """The tensor of runtime file ``fmt`` -> our ``att.time_state``."""
        return self._relayout(s, fmt.layout, self.state_layout)

    def blinkdl_to_hf(self, sd, where: str):
        """(config, our state dict) of a BlinkDL state dict of this version."""
        return self._get("convert", "blinkdl_to_hf")(sd, where=where)

    def hf_to_blinkdl(self, sd, config):
        return self._get("convert", "hf_to_blinkdl")(sd, config)


VERSIONS: Tuple[Version, ...] = (
    Version("rwkv7", "RWKV-7", "7", "RWKV7",
            _presets(_ATTENTION, _FFN, [f"att.{x}_lora.{p}" for x in "wavg" for p in ("down", "up")]),
            never_targeted=("blocks.0.att.v_lora.down", "blocks.0.att.v_lora.up"), state_tuning=True,
            runtime_state_files=RUNTIME_STATE_FILES),
    Version("rwkv6", "RWKV-6", "6", "RWKV6",
            _presets((*_ATTENTION, "att.gate"), (*_FFN, "ffn.receptance"),
                     ("att.maa_lora.down", "att.decay_lora.down", "att.decay_lora.up")),
            state_tuning=True, runtime_state_layout=KEY_VALUE, runtime_reads_checkpoint_state=True,
            runtime_state_files=RUNTIME_STATE_FILES),
    Version("rwkv5", "RWKV-5.2", "5.2", "RWKV5",  # no low-rank maps: "all" is the default set
            _presets((*_ATTENTION, "att.gate"), (*_FFN, "ffn.receptance")),
            state_tuning=True, runtime_state_layout=KEY_VALUE, runtime_reads_checkpoint_state=True,
            runtime_state_files=RUNTIME_STATE_FILES),
    # RWKV-4: no heads, no gate, no low-rank maps ("all" is the default set); its WKV state is three vectors per
    # channel (numerator, denominator, shared exponent: [B, 3, A]), no matrix state to learn, so no state tuning
    Version("rwkv4", "RWKV-4", "4", "RWKV4",
            _presets(_ATTENTION, (*_FFN, "ffn.receptance")), state_tuning=False,
            notes="WKV state per layer: (aa, bb, pp) stacked as [B, 3, attention_hidden_size]"),
)
DEFAULT = VERSIONS[0]


class UnsupportedVersionError(CheckpointError):
    """A checkpoint or model of an RWKV generation this package does not read (yet)."""


def supported() -> str:
    return ", ".join(v.title for v in VERSIONS)


def by_model_type(model_type: Optional[str]) -> Optional[Version]:
    """The version whose HF ``model_type`` (``config.json``) this is; None for any other."""
    return next((v for v in VERSIONS if v.model_type == model_type), None)


def by_name(name: Optional[str]) -> Optional[Version]:
    """The version called ``name`` in adapter manifests and state files ("rwkv6"); None for any other."""
    return next((v for v in VERSIONS if v.name == name), None)


def by_blinkdl(version: str, where: str = "checkpoint") -> Version:
    """The version of a BlinkDL ``.pth`` that ``detect_blinkdl_version`` called ``version``."""
    found = next((v for v in VERSIONS if v.blinkdl == version), None)
    if found is None:
        raise UnsupportedVersionError(f"{where}: RWKV-{version} checkpoint; supported: {supported()}")
    return found


def of(model_or_config) -> Version:
    """The version of a model (ours, wrapped by peft or not) or of its config; RWKV-7 when it has none."""
    config = getattr(model_or_config, "config", model_or_config)
    return by_model_type(getattr(config, "model_type", None)) or DEFAULT
