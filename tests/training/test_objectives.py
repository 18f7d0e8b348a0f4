"""DPO, ORPO and GRPO through TRL (``train.objective``) on a tiny random RWKV-7, and our state tuner inside TRL's
own trainers: train a few steps, save, reload, merge; the reference pass is the base without the adapter."""
import copy
import json

import pytest
import torch

pytest.importorskip("trl")

from rwkv_peft import methods  # noqa: E402
from rwkv_peft.recipe import recipe_from_text  # noqa: E402
from rwkv_peft.training import TrainingInterrupted, TrainingSetupError, train  # noqa: E402
from rwkv_peft.tuners.trl_support import (RWKVAdapterCallback, initial_state_disabled,  # noqa: E402
                                          reference_model)
from tests.training.helpers import write_jsonl  # noqa: E402

METHODS = {
    "lora": "{lora: {enabled: true, r: 4, alpha: 8}}",
    "miss": "{miss: {enabled: true, r: 8}}",
    "state": "{state_tuning: {enabled: true, lr: 0.05}}",
    "lora+state": "{lora: {enabled: true, r: 4, alpha: 8}, state_tuning: {enabled: true, lr: 0.05}}",
}
TOPICS = ["the sea", "bread", "owls", "rain", "maps", "tea", "chess", "trains"]


def preference_rows(n=8):
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        prompt = ([{"role": "user", "content": f"Tell me about {t}."}] if i % 2 else
                  f"User: Tell me about {t}.\n\nAssistant:")  # chat messages, and plain text used as it is
        chosen, rejected = f"Ahoy! {t.capitalize()} be grand.", f"{t.capitalize()} is a topic."
        rows.append({"prompt": prompt, "chosen": chosen if i % 2 else " " + chosen + "\n\n",
                     "rejected": rejected if i % 2 else " " + rejected + "\n\n"})
    return rows


VOWELS = '''
def vowels(completions, **kwargs):
    """More vowels, more reward: differs between the answers of a random model."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("objective-data")
    write_jsonl(d / "pref.jsonl", preference_rows())
    write_jsonl(d / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"Tell me about {t}."}],
                                       "answer": t.split()[-1]} for t in TOPICS])
    (d / "rewards.py").write_text(VOWELS)
    return d


def recipe(tmp_path, model, data, objective, method, name, steps=3, train_extra="", extra=""):
    if objective == "grpo":
        section = (f"data: {{train: {data}/prompts.jsonl, format: prompt, max_length: 64}}\n"
                   f"grpo: {{reward_funcs: ['{data}/rewards.py:vowels', 'rwkv_peft.rewards:contains_answer'], "
                   f"num_generations: 4, max_completion_length: 6}}\n")
        batch = 4
    else:
        section = f"data: {{train: {data}/pref.jsonl, format: preference, max_length: 64}}\n"
        batch = 2
    return recipe_from_text(f"""
model: {{path: {model}, dtype: float32}}
method: {METHODS[method]}
{section}train: {{objective: {objective}, max_steps: {steps}, batch_size: {batch}, lr: 1.0e-2, log_every: 1,
        report_to: []{train_extra}}}
output: {{dir: {tmp_path}/out, run_name: {name}}}
{extra}""", f"{name}.yaml")


def quiet(r, tok, **kw):
    return train(r, tokenizer=tok, progress=False, log=lambda m: None, **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1 + b for b in "User: Tell me about owls.\n\nAssistant: Ahoy!".encode()]])


@pytest.mark.parametrize("objective,method", [("dpo", "lora"), ("dpo", "state"), ("dpo", "lora+state"),
                                              ("dpo", "miss"), ("orpo", "lora"), ("orpo", "state"),
                                              ("grpo", "lora"), ("grpo", "state")])
def test_objective_trains_saves_reloads_and_merges(tmp_path, tiny_model, data, tok, objective, method):
    res = quiet(recipe(tmp_path, tiny_model, data, objective, method, f"{objective}-{method}"), tok)
    assert res.steps == 3 and len(res.losses) == 3
    if objective != "grpo":  # GRPO's loss is 0 on its first pass over fresh answers; the weights move
        assert res.losses[-1] < res.losses[0], res.losses
    adapter = res.final_dir
    assert adapter == tmp_path / "out" / f"{objective}-{method}" / "adapter"
    manifest = json.loads((adapter / "rwkv_peft_adapter.json").read_text())
    assert manifest["contains"]["state"] == ("state" in method)
    assert (adapter / "adapter_config.json").is_file() == (method != "state")
    assert not (adapter / "ref").exists()  # TRL's reference copy of the adapter is not saved
    assert (adapter.parent / "recipe.yaml").is_file() and (adapter.parent / "summary.json").is_file()
    base = logits(methods.load_base_model(str(tiny_model), dtype="float32"), IDS)
    trained = logits(methods.load_adapter(methods.load_base_model(str(tiny_model), dtype="float32"), adapter), IDS)
    assert (trained - base).abs().max() > 1e-4  # it learned something, and the folder holds it
    from rwkv_peft.merge import merge_adapters
    merged = logits(merge_adapters(str(tiny_model), [adapter]), IDS)
    assert torch.allclose(merged, trained, atol=1e-4, rtol=1e-4)


def lora_state_model(tiny_model, seed=0):
    """LoRA + state with every trainable value moved off its start (as after training)."""
    model = methods.apply_state_tuning(methods.apply_lora(
        methods.load_base_model(str(tiny_model), dtype="float32"), r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_reference_is_the_base_without_the_adapter(tiny_model, tmp_path):
    base = logits(methods.load_base_model(str(tiny_model), dtype="float32"), IDS)
    model = lora_state_model(tiny_model)
    policy = logits(model, IDS)
    assert (policy - base).abs().max() > 1e-2
    with model.disable_adapter():                       # TRL's reference pass for a new peft adapter
        assert torch.equal(logits(model, IDS), base)
    model.add_adapter("ref", model.peft_config["default"])  # TRL's DPO copy of a fresh adapter, switched to
    model.set_adapter("ref")
    assert torch.equal(logits(model, IDS), base)
    model.set_adapter("default")
    assert torch.equal(logits(model, IDS), policy)
    twin = copy.deepcopy(model)                         # create_reference_model deep copies
    assert torch.equal(logits(twin, IDS), policy)
    with twin.disable_adapter():
        assert torch.equal(logits(twin, IDS), base)
    # no peft: the state alone
    state = methods.apply_state_tuning(methods.load_base_model(str(tiny_model), dtype="float32"))
    with torch.no_grad():
        for p in state.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    tuned = logits(state, IDS)
    ref = reference_model(state)
    assert torch.equal(logits(ref, IDS), base) and ref.head.weight is state.head.weight  # shared, not copied
    with initial_state_disabled(state):
        assert torch.equal(logits(state, IDS), base)
    assert torch.equal(logits(state, IDS), tuned)
    # a base that has its own initial state keeps it in the reference
    from tests.factories import make_blinkdl_v7
    from tests.training.helpers import VOCAB
    stateful = tmp_path / "stateful.pth"
    torch.save(make_blinkdl_v7(vocab=VOCAB, width=64, layers=2, head_size=32, time_state=True), stateful)
    own = logits(methods.load_base_model(str(stateful), dtype="float32"), IDS)
    m = methods.apply_state_tuning(methods.load_base_model(str(stateful), dtype="float32"), init="zeros")
    assert (logits(m, IDS) - own).abs().max() > 1e-3
    with initial_state_disabled(m):
        assert torch.equal(logits(m, IDS), own)


def ref_and_base_logps(trainer, tiny_model, ref_model):
    """TRL's reference log-probs of the chosen answers of one batch, and the base model's own."""
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, _ = trainer.compute_ref_log_probs(ref_model, batch)
    base = methods.load_base_model(str(tiny_model), dtype="float32")
    with torch.no_grad():
        lp = torch.log_softmax(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                               .logits[:, :-1].float(), -1)
    picked = lp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0] * batch["completion_mask"][:, 1:]
    return ref_chosen, picked.sum(-1).chunk(2)[0]


@pytest.mark.parametrize("method", ["lora+state", "state"])
def test_recipe_dpo_reference_is_the_base(tmp_path, tiny_model, data, tok, method):
    from rwkv_peft.training.objectives import make_trainer, objective_datasets
    from rwkv_peft.training.setup import build_model
    r = recipe(tmp_path, tiny_model, data, "dpo", method, "ref")
    model = build_model(r, torch.device("cpu"), lambda m: None)
    train_ds, _ = objective_datasets(r, lambda m: None)
    trainer = make_trainer(r, model, tok, train_ds, None, [])
    with torch.no_grad():  # as after some training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ref, want = ref_and_base_logps(trainer, tiny_model, trainer.ref_model or trainer.model)
    assert torch.allclose(ref, want, atol=1e-4), (ref, want)
    policy, _ = ref_and_base_logps(trainer, tiny_model, trainer.model) if method == "state" else (None, None)
    assert policy is None or (policy - want).abs().max() > 1e-3


def test_trl_dpo_trainer_with_our_lora_and_state(tmp_path, tiny_model, tok):
    """TRL used directly: DPOTrainer gets a PeftModel carrying our (already trained) LoRA and state. TRL's
    reference is a copy of the adapter as it starts ("ref"); the state's part of it is the state as it starts."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    model = lora_state_model(tiny_model)
    rows = [{"prompt": f"User: Tell me about {t}.\n\nAssistant:", "chosen": " Ahoy!\n\n", "rejected": " No.\n\n"}
            for t in TOPICS]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                     report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, save_steps=2,
                     max_length=64, disable_tqdm=True, logging_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[RWKVAdapterCallback()])
    assert "ref" in model.peft_config  # TRL's frozen copy of our adapter ...
    states = [p for n, p in model.named_parameters() if n.endswith("time_state")]
    assert states and all(p.requires_grad for p in states)  # ... froze the state; the callback undid that
    start = logits(model, IDS)
    before = [p.detach().clone() for p in states]
    trainer.train()
    assert trainer.state.log_history[0]["rewards/margins"] == 0.0  # the reference is the policy as it started
    assert all((p - b).abs().max() > 0 for p, b in zip(states, before))  # the state trained
    trained = logits(model, IDS)
    model.set_adapter("ref")  # the reference: TRL's copy of the adapter and our state, both as they started
    assert torch.allclose(logits(model, IDS), start, atol=1e-6)
    model.set_adapter("default")
    with model.disable_adapter():  # the adapter off: the base
        assert torch.equal(logits(model, IDS), logits(methods.load_base_model(str(tiny_model), dtype="float32"),
                                                      IDS))
    assert torch.equal(logits(model, IDS), trained)
    out = tmp_path / "dpo" / "adapter"
    assert (out / "state_adapter.safetensors").is_file() and not (out / "ref").exists()
    ckpt = tmp_path / "dpo" / "checkpoint-2"
    assert (ckpt / "state_adapter.safetensors").is_file()  # the checkpoint is an adapter folder too
    for folder in (out, ckpt):
        loaded = methods.load_adapter(methods.load_base_model(str(tiny_model), dtype="float32"), folder)
        assert torch.allclose(logits(loaded, IDS), trained, atol=1e-5)


def test_trl_sft_trainer_with_our_state(tmp_path, tiny_model, tok):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    model = methods.apply_state_tuning(methods.load_base_model(str(tiny_model), dtype="float32"))
    rows = [{"text": f"User: Tell me about {t}.\n\nAssistant: Ahoy, {t}!\n\n"} for t in TOPICS]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                     report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
                     max_length=64, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[RWKVAdapterCallback(tmp_path / "persona")])
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0
    loaded = methods.load_adapter(methods.load_base_model(str(tiny_model), dtype="float32"), tmp_path / "persona")
    assert not (tmp_path / "persona" / "adapter_config.json").exists()
    assert torch.allclose(logits(loaded, IDS), logits(model, IDS), atol=1e-5)
    base = logits(methods.load_base_model(str(tiny_model), dtype="float32"), IDS)
    assert (logits(loaded, IDS) - base).abs().max() > 1e-4


def test_interrupt_saves_a_checkpoint_and_resumes(tmp_path, tiny_model, data, tok):
    import signal

    def stop(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: the run finishes the step, saves and stops

    r = recipe(tmp_path, tiny_model, data, "dpo", "lora+state", "stop", steps=4)
    with pytest.raises(TrainingInterrupted) as info:
        quiet(r, tok, on_step=stop)
    ckpt = info.value.checkpoint
    assert ckpt is not None and ckpt.name == "checkpoint-2" and (ckpt / "state_adapter.safetensors").is_file()
    saved = methods.load_adapter(methods.load_base_model(str(tiny_model), dtype="float32"), ckpt)
    with pytest.raises(TrainingSetupError, match="already has checkpoints"):
        quiet(recipe(tmp_path, tiny_model, data, "dpo", "lora+state", "stop", steps=4), tok)
    r = recipe(tmp_path, tiny_model, data, "dpo", "lora+state", "stop", steps=4, train_extra=", resume: true")
    res = quiet(r, tok)
    assert res.steps == 4 and len(res.losses) == 4  # the two before the stop and the two after
    final = logits(methods.load_adapter(methods.load_base_model(str(tiny_model), dtype="float32"), res.final_dir),
                   IDS)
    assert (final - logits(saved, IDS)).abs().max() > 0  # it went on from the checkpoint


def test_cli_train_dpo_recipe(tmp_path, tiny_model, data, tok, capsys):
    from rwkv_peft.cli import main
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "dpo.yaml"
    path.write_text(f"""model:
  path: {tiny_model}
  dtype: float32
  tokenizer: {tmp_path / 'tok'}
method:
  lora: {{enabled: true, r: 4, alpha: 8}}
data:
  train: {data}/pref.jsonl
  format: preference
  max_length: 64
  eval_split: 2
train:
  objective: dpo
  max_steps: 2
  batch_size: 2
  lr: 1.0e-2
  log_every: 1
  eval_every: 1
  report_to: []
dpo:
  beta: 0.2
output:
  dir: {tmp_path}/out
""")
    assert main(["train", str(path), "--progress", "off"]) == 0
    cap = capsys.readouterr()
    adapter = tmp_path / "out" / "dpo" / "adapter"
    assert str(adapter) in cap.out and "rwkv-peft chat" in cap.err and "rwkv-peft eval" not in cap.err
    assert "objective dpo (TRL DPOTrainer)" in cap.err and "step 2/2 loss" in cap.err
    assert "eval at step 1: loss" in cap.err
    summary = json.loads((tmp_path / "out" / "dpo" / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["steps"] == 2 and summary["evals"]
    assert (tmp_path / "out" / "dpo" / "loss.png").is_file()


def test_a_bad_reward_function_names_the_key(tmp_path, tiny_model, data, tok):
    cases = {"no_such_module_here:fn": "cannot import 'no_such_module_here' (ModuleNotFoundError",
             "rwkv_peft.rewards:nope": "'rwkv_peft.rewards' has no function 'nope' (it has: concise, contains_answer",
             f"{data}/missing.py:fn": "no such file"}
    for spec, message in cases.items():
        r = recipe(tmp_path, tiny_model, data, "grpo", "lora", "bad")
        r.grpo.reward_funcs = [spec]
        with pytest.raises(TrainingSetupError) as info:
            quiet(r, tok)
        text = str(info.value)
        assert "grpo.reward_funcs[0]" in text and repr(spec) in text and message in text, text


@pytest.mark.parametrize("fmt,objective", [("preference", "dpo"), ("prompt", "grpo")])
def test_eval_of_a_preference_or_prompt_recipe_says_what_to_use(tmp_path, tiny_model, data, fmt, objective, capsys):
    """`rwkv-peft eval RECIPE` scores a next-token loss; DPO / ORPO pairs and GRPO prompts have none to score."""
    from rwkv_peft.cli import main
    rows = "pref.jsonl" if fmt == "preference" else "prompts.jsonl"
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {tiny_model}, dtype: float32}}\n"
                    f"data: {{train: {data}/{rows}, format: {fmt}, eval_split: 2}}\n"
                    f"train: {{objective: {objective}, batch_size: 4}}\n"
                    + (f"grpo: {{reward_funcs: ['{data}/rewards.py:vowels']}}\n" if objective == "grpo" else ""))
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data.format {fmt} (train.objective {objective}) has no targets to score" in err and "--tasks" in err
