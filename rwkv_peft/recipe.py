"""The YAML recipe: one typed, validated section per concern (model, method, data, train, eval, output, hub).

``load_recipe(path, overrides=["train.lr=2e-4"])`` reads a recipe, applies command-line overrides and validates
everything before any work starts. Problems are collected into one :class:`RecipeError` whose lines name the
file and line (read off the YAML node marks), the key, the bad value, what is allowed, and, for a misspelled
key, the nearest valid one.

Every section forbids unknown keys. ``recipe.to_yaml()`` dumps the resolved recipe (defaults filled in), which
the training loop saves beside its outputs.

Paths in a recipe are relative to the current directory; a path that starts with ``assets:`` is read from the
files that ship inside the package (``rwkv_peft/assets/``), which is how the quickstart recipe finds its model.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)
from typing_extensions import Annotated

from .errors import RWKVPeftError

ASSETS_PREFIX = "assets:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def resolve_path(path: str) -> Path:
    """A recipe path as a filesystem path (``assets:x`` -> the package's ``assets/x``; ``~`` expanded)."""
    if path.startswith(ASSETS_PREFIX):
        return ASSETS_DIR / path[len(ASSETS_PREFIX):].lstrip("/")
    return Path(os.path.expanduser(path))


def _yaml_bool_to_word(v: Any) -> Any:
    # YAML 1.1 reads an unquoted `no` / `off` as False and `on` as True.
    if v is False:
        return "no"
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- model ----------------------------------------------------------------------------------------------------

class ModelSection(Section):
    """The base model: a BlinkDL ``.pth`` or one of our Hugging Face folders."""
    path: str = Field(description="BlinkDL .pth file or Hugging Face folder of the base model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the base weights are loaded in (use float32 for a full fine-tune)")
    quantization: Optional[Literal["nf4", "fp4", "int8"]] = Field(
        None, description="load the base weights quantized with bitsandbytes (QLoRA); needs a method")
    double_quant: bool = Field(False, description="quantize the 4-bit quantization constants too")
    tokenizer: Optional[str] = Field(
        None, description="'world', or a Hugging Face tokenizer folder; default: the model folder's tokenizer "
                          "if it has one, else the RWKV World tokenizer")

    @field_validator("quantization", mode="before")
    @classmethod
    def _no_quant(cls, v):
        return None if v is False or v == "none" else v

    @model_validator(mode="after")
    def _check(self):
        if self.double_quant and self.quantization not in ("nf4", "fp4"):
            raise ValueError("double_quant needs quantization: nf4 or fp4")
        return self


# ---- method ---------------------------------------------------------------------------------------------------

LORA_TARGETS = ("default", "attention", "ffn", "all")
TargetsField = Union[Literal["default", "attention", "ffn", "all"], List[str]]


def _check_patterns(v: Optional[dict]) -> Optional[dict]:
    """rank_pattern / alpha_pattern keys: regular expressions (peft matches each against a module name's tail)."""
    for key in v or {}:
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"key {key!r} is not a valid regular expression ({e}); a key is a module name such as "
                             f"'blocks.0.att.key' or a regex such as 'blocks\\.[0-3]\\.ffn\\.key'") from None
    return v


class LoraSection(Section):
    enabled: bool = Field(False, description="train LoRA adapters (peft)")
    r: int = Field(16, gt=0, description="rank")
    alpha: float = Field(32, gt=0, description="scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: TargetsField = Field("default", description="default | attention | ffn | all | a list of module names")
    variant: Literal["lora", "dora", "rslora"] = "lora"
    modules_to_save: Optional[List[str]] = Field(None, description="modules trained in full beside the adapters")
    init: Optional[Literal["pissa", "olora", "gaussian"]] = Field(None, description="adapter initialisation")
    rank_pattern: Dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="per-module ranks: {module name, its tail, or a regex: rank}, e.g. "
                                          "{'blocks.0.att.key': 4, 'ffn\\.(key|value)': 32}; others keep r")
    alpha_pattern: Dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="per-module alphas, keyed like rank_pattern; others keep alpha")

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v):
        return _check_patterns(v)


class MissSection(Section):
    """MiSS (peft's MissConfig): one small shared block per wrapped Linear instead of LoRA's two factors."""
    enabled: bool = Field(False, description="train MiSS adapters (peft); not together with method.lora")
    r: int = Field(64, gt=0, description="shard size along in_features (<= in_features of every target; "
                                         "an even number for the default variant)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: TargetsField = Field("default", description="default | attention | ffn | all | a list of module names")
    variant: Literal["balance", "bat", "mini"] = Field(
        "balance", description="balance (peft's default), bat (in and out divisible by r), mini (needs mini_r)")
    mini_r: Optional[int] = Field(None, gt=0, description="variant mini: block width along out_features "
                                                          "(out_features divisible by it)")
    modules_to_save: Optional[List[str]] = Field(None, description="modules trained in full beside the adapters")

    @model_validator(mode="after")
    def _check(self):
        if self.variant == "mini" and self.mini_r is None:
            raise ValueError("variant: mini needs mini_r (e.g. mini_r: 64)")
        if self.mini_r is not None and self.variant != "mini":
            raise ValueError(f"mini_r is used by variant: mini only (variant is {self.variant!r})")
        return self


class StateTuningSection(Section):
    enabled: bool = Field(False, description="train the initial WKV state of every layer")
    init: str = Field("zeros", description="'zeros', 'keep' (the state the checkpoint has, zeros if none), or a "
                                           "state file (.pth with blocks.N.att.time_state, or an adapter folder)")
    lr: Optional[float] = Field(None, gt=0, description="learning rate of the state (default: train.lr); "
                                                        "states usually want a much larger one than LoRA")
    full: bool = Field(False, description="full-state tuning: both token-shift states of every layer train too "
                                          "(the first token's 'previous token' in each mix)")


class MethodSection(Section):
    lora: LoraSection = Field(default_factory=LoraSection)
    miss: MissSection = Field(default_factory=MissSection)
    state_tuning: StateTuningSection = Field(default_factory=StateTuningSection)

    @model_validator(mode="after")
    def _check(self):
        if self.lora.enabled and self.miss.enabled:
            raise ValueError("method.lora and method.miss are both enabled: peft cannot put a LoRA and a MiSS "
                             "adapter on one model (its mixed-adapter model takes LoRA-family adapters only); "
                             "enable one of them (each combines with method.state_tuning)")
        return self

    @property
    def kind(self) -> str:
        """'full' (no method: every weight trains), 'lora', 'miss', 'state', 'lora+state' or 'miss+state'."""
        parts = [n for n, on in (("lora", self.lora.enabled), ("miss", self.miss.enabled),
                                 ("state", self.state_tuning.enabled)) if on]
        return "+".join(parts) or "full"


# ---- data -----------------------------------------------------------------------------------------------------

class FieldNames(Section):
    """Column names in the dataset rows."""
    text: str = "text"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    persona: str = "persona"
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class RoleNames(Section):
    system: str = "System"
    user: str = "User"
    assistant: str = "Assistant"


class InstructionNames(Section):
    instruction: str = "Instruction"
    input: str = "Input"
    response: str = "Response"


class TemplateSection(Section):
    """How turns become text: ``{role}{role_separator}{content}{turn_separator}`` per turn.

    The default is the RWKV chat format ``User: hi\\n\\nAssistant: hello\\n\\n``. An assistant turn is split
    after the role name and the non-blank part of the separator (``Assistant:``), so the trained tokens are
    `` hello\\n\\n`` - what the model generates after a prompt that ends in ``Assistant:``.

    Chat and persona rows are rendered by the tokenizer's chat template ``name``
    (``rwkv_peft/tokenization/chat_templates.py``, the same Jinja source as ``tokenizer.apply_chat_template``):
    ``rwkv`` is the format above; ``g1`` is the RWKV-7 G1 reasoning format, where each assistant turn is
    ``Assistant: <think>\\nREASONING\\n</think>\\nANSWER\\n\\n`` (an empty ``<think>\\n</think>`` without
    reasoning), and ``train_think`` says whether the think block is trained or only the answer after it. The other
    keys here are the templates' settings.
    """
    name: Literal["rwkv", "g1"] = Field("rwkv", description="chat template for chat/persona rows: rwkv (User/"
                                                            "Assistant) or g1 (RWKV-7 G1, with <think> blocks)")
    train_think: bool = Field(True, description="g1: train the think block of assistant turns too (false: only "
                                                "the answer after </think>)")
    roles: RoleNames = Field(default_factory=RoleNames)
    instruction: InstructionNames = Field(default_factory=InstructionNames)
    role_separator: str = ": "
    turn_separator: str = "\n\n"
    collapse_blank_lines: bool = Field(True, description="replace blank lines inside a turn with one newline "
                                                         "(a blank line ends a turn in the RWKV format)")


class LongContextSection(Section):
    mode: Literal["truncate", "chunk"] = Field(
        "truncate", description="truncate: cut samples to max_length; chunk: run each row chunk_len tokens at "
                                "a time, carrying the RWKV state from chunk to chunk")
    chunk_len: int = Field(512, gt=0, description="tokens per forward pass in chunk mode")
    grad_chunks: int = Field(1, gt=0, description="chunks the gradient flows through before the carried state "
                                                  "is detached (1 = truncated backprop per chunk; memory grows "
                                                  "with this number)")
    recompute: bool = Field(False, description="carry the gradient through the whole row at the memory of one "
                                               "chunk: each chunk is run again in the backward from the state "
                                               "saved at its start (about 1.3x the compute; grad_chunks unused)")


class DataSection(Section):
    train: Union[str, List[str]] = Field(description="file(s), a folder, a save_to_disk folder, a binidx "
                                                     "prefix, or a hub dataset name")
    eval: Optional[Union[str, List[str]]] = Field(None, description="held-out data (same kinds as train)")
    eval_split: float = Field(0.0, ge=0.0, description="hold out this fraction (< 1) or this many rows (>= 1) "
                                                       "of train when eval is not given")
    split: str = Field("train", description="split to read from a hub dataset or a saved DatasetDict")
    format: Literal["text", "instruction", "chat", "persona", "preference", "prompt"] = Field(
        "text", description="preference: prompt, chosen, rejected (train.objective dpo / orpo); prompt: prompts "
                            "and any columns the reward functions read (grpo)")
    fields: FieldNames = Field(default_factory=FieldNames)
    template: TemplateSection = Field(default_factory=TemplateSection)
    persona: Optional[str] = Field(None, description="persona text for rows that have none (persona format)")
    persona_in_prompt: bool = Field(True, description="write the persona as a System turn before the dialogue "
                                                      "(false when a tuned state should carry it)")
    loss_on: Literal["assistant", "all"] = Field("assistant", description="which tokens the loss is taken on")
    add_eos: bool = Field(True, description="end every sample with the end-of-text token (id 0)")
    max_length: int = Field(1024, gt=1, description="tokens per training row (the longest kept sample)")
    pack: bool = Field(False, description="pack several short samples into each row")
    pack_state: Literal["reset", "carry"] = Field(
        "reset", description="what a packed sample starts from: reset = the initial state, as if alone (fine-"
                             "tuning; state tuning); carry = the state the previous sample left (pre-training "
                             "on documents)")
    long_context: LongContextSection = Field(default_factory=LongContextSection)
    on_bad_row: Literal["skip", "fail"] = Field("fail", description="what a malformed row does")
    num_proc: int = Field(1, gt=0, description="processes for tokenization")
    cache_dir: Optional[str] = Field(None, description="datasets cache folder (default: datasets' own)")

    @model_validator(mode="after")
    def _check(self):
        lc = self.long_context
        if lc.mode == "chunk" and lc.chunk_len >= self.max_length:
            raise ValueError(f"long_context.chunk_len ({lc.chunk_len}) must be smaller than max_length "
                             f"({self.max_length}) in chunk mode")
        if self.eval is not None and self.eval_split:
            raise ValueError("give either eval (files) or eval_split (a held-out part of train), not both")
        if self.eval_split >= 1 and self.eval_split != int(self.eval_split):
            raise ValueError(f"eval_split {self.eval_split}: a fraction below 1, or a whole number of rows")
        return self


# ---- train / eval / output / hub ------------------------------------------------------------------------------

class TrainSection(Section):
    epochs: float = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(1, gt=0, description="rows per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: Tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: Optional[int] = Field(None, ge=0)
    warmup_ratio: Optional[float] = Field(None, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max gradient norm (null: no clipping)")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    log_every: int = Field(10, gt=0)
    save_every: Optional[int] = Field(None, gt=0, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, gt=0, description="how many recent checkpoints to keep")
    eval_every: Optional[int] = Field(None, gt=0)
    resume: Union[bool, str] = Field(False, description="true: the latest checkpoint in the output folder; "
                                                        "or a checkpoint folder")
    report_to: List[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    objective: Literal["sft", "dpo", "orpo", "grpo"] = Field(
        "sft", description="sft: next-token loss (our loop); dpo / orpo: preference pairs, grpo: prompts and "
                           "reward functions (through TRL; settings in the dpo / orpo / grpo section)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _word(cls, v):
        return _yaml_bool_to_word(v)

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self


# ---- objectives beyond sft (through TRL; training/objectives.py) ------------------------------------------------

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
REWARD_PATH = re.compile(r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_]*$")


class DPOSection(Section):
    """Direct preference optimisation (TRL's DPOTrainer) on ``data.format: preference`` rows. The reference is the
    base model: the adapter off (LoRA / MiSS disabled, the base's own initial state)."""
    beta: float = Field(0.1, gt=0, description="how strongly the policy is held to the reference (TRL's beta; "
                                               "0.1 is usual, larger stays closer)")
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description="TRL's DPO loss: sigmoid (DPO), ipo, hinge, "
                                                                  "robust, ... (TRL's DPOConfig.loss_type)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed fraction of flipped labels "
                                                                    "(robust / cDPO)")


class ORPOSection(Section):
    """Odds-ratio preference optimisation (TRL's ORPOTrainer): SFT on the chosen answer plus an odds-ratio term;
    no reference model."""
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term (lambda in the ORPO paper)")


class GRPOSection(Section):
    """Group relative policy optimisation (TRL's GRPOTrainer) on ``data.format: prompt`` rows: each prompt is
    answered ``num_generations`` times and the answers are rewarded against each other."""
    reward_funcs: List[str] = Field(
        default_factory=list, description="reward functions as 'package.module:function' (or 'file.py:function'); "
                                          "each gets prompts=, completions= and the row's other columns as lists "
                                          "and returns one float per completion (see rwkv_peft/rewards.py)")
    reward_weights: Optional[List[float]] = Field(None, description="one weight per reward function (default 1)")
    num_generations: int = Field(4, ge=2, description="answers per prompt (train.batch_size x train.grad_accum "
                                                      "counts answers and must be a multiple of it)")
    max_completion_length: int = Field(128, gt=0, description="tokens generated per answer at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the answers")
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(0, ge=0, description="0: no top-k")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference (the adapter off); 0 (TRL's "
                                               "default) needs no reference pass")
    epsilon: float = Field(0.2, gt=0, description="clipping of the policy ratio")
    num_iterations: int = Field(1, gt=0, description="optimisation passes over each batch of answers")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide the advantages by the "
                                                                                  "reward spread of the group, "
                                                                                  "the batch, or not at all")
    log_completions: bool = Field(False, description="print a table of prompts, answers and rewards at each log")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _word(cls, v):
        return _yaml_bool_to_word(v)

    @field_validator("reward_funcs")
    @classmethod
    def _paths(cls, v):
        for i, item in enumerate(v):
            if not REWARD_PATH.match(item):
                raise ValueError(f"item {i} {item!r}: expected 'package.module:function' or "
                                 f"'path/to/file.py:function', e.g. 'rwkv_peft.rewards:concise'")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} weights for {len(self.reward_funcs)} "
                             f"reward functions")
        return self


class EvalSection(Section):
    batch_size: Optional[int] = Field(None, gt=0, description="default: train.batch_size")
    max_batches: Optional[int] = Field(None, gt=0, description="cap on batches per evaluation")
    at_end: bool = Field(True, description="evaluate after the last step")
    prompts: List[str] = Field(default_factory=list, description="prompts to generate from at each evaluation")
    max_new_tokens: int = Field(48, gt=0)


class OutputSection(Section):
    dir: str = Field("outputs", description="parent folder of runs")
    run_name: Optional[str] = Field(None, description="default: the recipe file's name")
    overwrite: bool = Field(False, description="allow starting afresh in a folder that has checkpoints")


class HubSection(Section):
    """Publishing. The token comes from HF_TOKEN or `huggingface-cli login`; a recipe never holds it."""
    repo_id: Optional[str] = None
    private: bool = True
    push: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.push and not self.repo_id:
            raise ValueError("push: true needs repo_id")
        return self


class Recipe(Section):
    model: ModelSection
    method: MethodSection = Field(default_factory=MethodSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    hub: HubSection = Field(default_factory=HubSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    orpo: ORPOSection = Field(default_factory=ORPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)

    _source: Optional[str] = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self):
        if self.model.quantization and self.method.kind == "full":
            raise ValueError("a quantized base cannot be fine-tuned in full: enable method.lora or "
                             "method.state_tuning (or remove model.quantization)")
        if self.method.lora.init == "pissa" and self.model.quantization:
            raise ValueError("method.lora.init: pissa needs a full-precision base (remove model.quantization)")
        problems = objective_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def source(self) -> Optional[str]:
        return self._source

    @property
    def run_name(self) -> str:
        if self.output.run_name:
            return self.output.run_name
        return Path(self._source).stem if self._source else "run"

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) / self.run_name

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def objective_problems(recipe: "Recipe") -> List[str]:
    """What does not fit ``train.objective`` (each message names the keys)."""
    obj, dc, meth = recipe.train.objective, recipe.data, recipe.method
    wanted = {"sft": None, "dpo": "preference", "orpo": "preference", "grpo": "prompt"}[obj]
    problems = []
    for other in ("dpo", "orpo", "grpo"):
        section = getattr(recipe, other)
        if other != obj and section != type(section)():  # a dumped recipe holds every section at its defaults
            problems.append(f"the {other} section is set but train.objective is {obj!r} (set train.objective: "
                            f"{other}, or remove the section)")
    if wanted is None and dc.format in ("preference", "prompt"):
        problems.append(f"data.format: {dc.format} is for train.objective: "
                        f"{'dpo or orpo' if dc.format == 'preference' else 'grpo'} (train.objective is sft)")
    if wanted is not None and dc.format != wanted:
        problems.append(f"train.objective: {obj} reads data.format: {wanted} rows "
                        + ("(prompt, chosen, rejected)" if wanted == "preference" else "(a prompt each)")
                        + f"; data.format is {dc.format!r}")
    if wanted is None:
        return problems
    if dc.long_context.mode == "chunk":
        problems.append(f"train.objective: {obj} runs each row in one pass: data.long_context.mode: chunk is not "
                        f"supported (use truncate and a data.max_length that holds prompt and answer)")
    if dc.pack:
        problems.append(f"data.pack: true is not supported with train.objective: {obj} (rows are pairs or prompts)")
    if meth.lora.enabled and meth.lora.init in ("pissa", "olora") and (obj == "dpo" or
                                                                      (obj == "grpo" and recipe.grpo.beta > 0)):
        problems.append(f"method.lora.init: {meth.lora.init} with train.objective: {obj}: the reference pass "
                        f"switches the adapter off, which leaves PiSSA / OLoRA's residual base instead of the base; "
                        f"use the default init")
    if obj == "grpo":
        g = recipe.grpo
        if not g.reward_funcs:
            problems.append("grpo.reward_funcs: train.objective: grpo needs at least one reward function, e.g. "
                            "['rwkv_peft.rewards:concise']")
        answers = recipe.train.batch_size * recipe.train.grad_accum
        if answers % g.num_generations:
            problems.append(f"train.batch_size x train.grad_accum ({answers}) counts answers in grpo and must be a "
                            f"multiple of grpo.num_generations ({g.num_generations})")
        if g.beta > 0 and meth.kind in ("state", "full"):
            problems.append(f"grpo.beta > 0 needs a reference model, which TRL's GRPOTrainer reloads from "
                            f"model.path for method {meth.kind!r}; use grpo.beta: 0, or method.lora / method.miss "
                            f"(the reference is the adapter switched off)")
    return problems


# ---- loading, overrides and error reporting -------------------------------------------------------------------

class RecipeError(RWKVPeftError, ValueError):
    """A recipe that cannot be used; ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _node_at(root: Optional[yaml.Node], loc: Sequence[Any]) -> Tuple[Optional[yaml.Node], int, Optional[yaml.Node]]:
    """The deepest YAML node along ``loc`` (value node), how many loc parts matched, and the key node."""
    node, depth, key_node = root, 0, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if hit is None:
                break
            key_node, node = hit
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            key_node, node = None, node.value[part]
        else:
            break
        depth += 1
    return node, depth, key_node


def _model_for(loc: Sequence[Any]):
    """The pydantic model class that holds the key at ``loc`` (for listing allowed keys)."""
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(str(part)) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def _fmt_value(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _suggest(bad: str, allowed: Sequence[str]) -> List[str]:
    """The nearest allowed key: difflib's best match, or a key the bad one starts with (``lrate`` -> ``lr``)."""
    close = difflib.get_close_matches(bad, allowed, n=1, cutoff=0.6)
    if close:
        return close
    low = bad.lower()
    prefixed = sorted((a for a in allowed if len(a) >= 2 and (low.startswith(a) or a.startswith(low))),
                      key=len, reverse=True)
    return prefixed[:1] or difflib.get_close_matches(bad, allowed, n=1, cutoff=0.5)


def _describe(err: dict, where: str) -> Tuple[Tuple, str]:
    loc = tuple(p for p in err["loc"])
    typ, ctx = err["type"], err.get("ctx") or {}
    # keep only the parts that are real keys/indices (unions add member names like 'literal[...]' or 'str')
    path = []
    for p in loc:
        if isinstance(p, int) or (isinstance(p, str) and not p.startswith(("literal[", "list[", "union[", "function-"))
                                  and p not in ("str", "int", "float", "bool")):
            path.append(p)
    key = ".".join(str(p) for p in path) or "(top level)"
    value = err.get("input")
    if typ == "extra_forbidden":
        parent = _model_for(path[:-1])
        allowed = sorted(parent.model_fields) if parent is not None else []
        bad = str(path[-1])
        msg = f"unknown key '{bad}'"
        close = _suggest(bad, allowed)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        if bad == "token" and path[:1] == ["hub"]:
            msg += " (tokens are never stored in recipes: set HF_TOKEN or run `huggingface-cli login`)"
        if bad in ("rank_pattern", "alpha_pattern") and path[:2] == ["method", "miss"]:
            msg += " (peft's MiSS has one rank for every module: no per-module ranks or alphas; method.lora has them)"
        if allowed:
            msg += f" (allowed in {'.'.join(map(str, path[:-1])) or 'the top level'}: {', '.join(allowed)})"
        return tuple(path), f"{where}: {key}: {msg}"
    if typ == "missing":
        return tuple(path), f"{where}: {key}: required key is missing"
    if typ == "literal_error":
        msg = f"{where}: {key}: {_fmt_value(value)} is not allowed; expected {ctx.get('expected')}"
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5) if isinstance(value, str) else []
        return tuple(path), msg + (f"; did you mean '{close[0]}'?" if close else "")
    if typ in ("value_error", "assertion_error"):
        msg = err["msg"].removeprefix("Value error, ")
        if not path:  # a rule across sections: the message names the keys
            return (), f"{where.rsplit(':', 1)[0] if where[-1:].isdigit() else where}: {msg}"
        return tuple(path), f"{where}: {key}: {msg}"
    return tuple(path), f"{where}: {key}: {_fmt_value(value)}: {err['msg']}"


def format_validation_error(e: ValidationError, source: str, root: Optional[yaml.Node],
                            override_keys: Dict[str, str]) -> RecipeError:
    errs = e.errors(include_url=False)
    # A union (e.g. lora.targets: a preset name or a list of names) reports one error per member. For a list or
    # mapping value the "not one of the names" error says nothing useful when the list member found the problem.
    deep = [tuple(map(str, x["loc"])) for x in errs]
    keep = []
    for err, loc in zip(errs, deep):
        if err["type"] == "literal_error" and isinstance(err.get("input"), (list, dict)):
            stem = loc[:-1]
            if any(other != loc and other[:len(stem)] == stem for other in deep):
                continue
        keep.append(err)
    seen: Dict[Tuple, List[str]] = {}
    for err in keep:
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc if not (isinstance(p, str) and "[" in p))
        origin = next((f"--set {o}" for k, o in override_keys.items() if dotted == k or dotted.startswith(k + ".")),
                      None)
        if origin is None:
            node, depth, key_node = _node_at(root, loc)
            if err["type"] == "extra_forbidden" and key_node is not None and depth == len(loc):
                node = key_node
            line = (node.start_mark.line + 1) if node is not None else None
            origin = f"{source}:{line}" if line else source
        path, text = _describe(err, origin)
        # union members each report the same value: keep the first line per key, and a literal one if any
        lines = seen.setdefault(path, [])
        if not lines or (err["type"] == "literal_error" and "expected" not in lines[0]):
            seen[path] = [text]
    return RecipeError([lines[0] for lines in seen.values()])


def parse_override(item: str) -> Tuple[List[str], Any]:
    """``"train.lr=2e-4"`` -> (['train', 'lr'], 2e-4). Values are read as YAML (numbers, true/false, lists)."""
    if "=" not in item:
        raise RecipeError([f"--set {item}: expected KEY=VALUE, e.g. train.lr=2e-4"])
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError([f"--set {item}: empty key"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError([f"--set {item}: value is not valid YAML ({e})"]) from None
    if isinstance(value, str):  # YAML 1.1 leaves '2e-4' a string; read it as the number it means
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> Dict[str, str]:
    """Set each ``a.b.c=value`` in ``data``; returns {dotted key: the override text} for error messages."""
    origins = {}
    for item in overrides or ():
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError([f"--set {item}: {'.'.join(parts[:i + 1])} is {_fmt_value(nxt)}, not a section"])
            node = nxt
        node[parts[-1]] = value
        origins[".".join(parts)] = item
    return origins


def recipe_from_text(text: str, source: str = "<recipe>", overrides: Sequence[str] = ()) -> Recipe:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RecipeError([f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: a recipe is a mapping of sections (model, method, data, train, ...), "
                           f"found {type(data).__name__}"])
    origins = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, source, root, origins) from None
    recipe._source = source
    return recipe


def load_recipe(path: os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file; ``overrides`` are ``"section.key=value"`` strings (``--set``)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{path}: cannot read ({e})"]) from None
    return recipe_from_text(text, str(path), overrides)


def _source_line(recipe: Recipe, loc: Sequence[str]) -> str:
    src = recipe.source
    if not src or not Path(src).is_file():
        return src or "<recipe>"
    try:
        root = yaml.compose(Path(src).read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return src
    node, depth, _ = _node_at(root, loc)
    return f"{src}:{node.start_mark.line + 1}" if node is not None and depth else src


def check_paths(recipe: Recipe) -> List[str]:
    """Problems with files the recipe names (model, data, state init, resume), each with its recipe line."""
    problems = []

    def need(loc, path_str, what):
        if not resolve_path(path_str).exists():
            problems.append(f"{_source_line(recipe, loc)}: {'.'.join(loc)}: {what} {path_str!r} does not exist")

    need(("model", "path"), recipe.model.path, "model file or folder")
    tok = recipe.model.tokenizer
    if tok and tok != "world":
        need(("model", "tokenizer"), tok, "tokenizer folder")
    init = recipe.method.state_tuning.init
    if recipe.method.state_tuning.enabled and init not in ("zeros", "keep"):
        need(("method", "state_tuning", "init"), init, "state file")
    from .data.loading import looks_like_hub_name
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        items = [value] if isinstance(value, str) else (value or [])
        for i, item in enumerate(items):
            loc = ("data", key) if isinstance(value, str) else ("data", key, i)
            if not resolve_path(item).exists() and not looks_like_hub_name(item) \
                    and not Path(str(resolve_path(item)) + ".idx").exists():
                problems.append(f"{_source_line(recipe, loc)}: data.{key}: {item!r} is not a file, folder or "
                                f"binidx prefix here, and does not look like a hub dataset name")
    if recipe.train.objective == "grpo":  # reward functions named by file (module names are imported at start)
        for i, spec in enumerate(recipe.grpo.reward_funcs):
            module = spec.rpartition(":")[0]
            if module.endswith(".py") and not resolve_path(module).is_file():
                problems.append(f"{_source_line(recipe, ('grpo', 'reward_funcs', i))}: grpo.reward_funcs[{i}]: "
                                f"reward file {module!r} does not exist")
    if isinstance(recipe.train.resume, str) and not resolve_path(recipe.train.resume).is_dir():
        problems.append(f"{_source_line(recipe, ('train', 'resume'))}: train.resume: checkpoint folder "
                        f"{recipe.train.resume!r} does not exist")
    return problems
