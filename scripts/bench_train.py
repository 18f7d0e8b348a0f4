#!/usr/bin/env python
"""Training throughput, peak memory and MFU of rwkv-peft's own training path, beside flash-linear-attention's
RWKV-7 model with a peft LoRA, on a random-weight RWKV-7 of a real shape.

Ours: ``rwkv_peft.training.train`` runs a recipe written for the case (the path ``rwkv-peft train`` takes: data
through ``datasets`` and the World tokenizer, packed rows of exactly ``ctx`` tokens, Accelerate, bf16 autocast,
gradient checkpointing, the chunked loss, AdamW). Cases: LoRA r64 (default targets), state tuning, LoRA + state,
QLoRA-NF4 (LoRA r64 on an NF4 base). fla: its ``RWKV7ForCausalLM`` at the same shape (same low-rank sizes), bf16
weights, peft LoRA r64 on the same six projections, gradient checkpointing, its own fused loss, AdamW, a plain
loop. Each case runs in its own process (a clean CUDA peak counter); the first ``--warmup`` steps are not timed.

Reported per case: tokens/s, peak ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and MFU =
tokens/s x model FLOPs per token / the device's dense bf16 peak. Model FLOPs per token count the matrix
products only: 2 P (forward) + 2 P (gradients to the activations) + 2 P_trainable (gradients to the trained
weights), P the parameters in Linear layers, the head included (the WKV recurrence adds ~3% at C = 2048 and is
left out; recomputation by checkpointing is not counted, as MFU does not count it).

    python scripts/bench_train.py                               # the issue's cases at 1.5B (GPU)
    python scripts/bench_train.py --cases lora,fla-lora --contexts 4096x2
    python scripts/bench_train.py --shape tiny --device cpu --steps 3 --warmup 1 --contexts 64x1   # a check on CPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_memory import SHAPES, VOCAB, write_random_checkpoint  # noqa: E402

SHAPES = {**SHAPES, "tiny": (2, 128)}
CASES = ("lora", "state", "lora+state", "qlora-nf4", "fla-lora")
# dense bf16 peaks from the vendors' data sheets (FLOP/s), by a name fragment of torch.cuda.get_device_name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
LORA_TARGETS_FLA = ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"]  # ours: the "default" preset


def recipe_text(args, case: str, data: Path, out: Path) -> str:
    """The recipe of one of our cases (YAML)."""
    lora = "lora" in case
    return f"""
model: {{path: {args.checkpoint}, dtype: {'bfloat16' if args.device != 'cpu' else 'float32'}{', quantization: nf4' if case == 'qlora-nf4' else ''}}}
method:
  lora: {{enabled: {str(lora).lower()}, r: {args.lora_r}, alpha: {2 * args.lora_r}, dropout: 0.0}}
  state_tuning: {{enabled: {str('state' in case).lower()}}}
data: {{train: {data}, format: text, max_length: {args.ctx}, pack: true}}
train:
  max_steps: {args.steps}
  batch_size: {args.batch}
  lr: 1.0e-5
  mixed_precision: {'bf16' if args.device != 'cpu' else 'no'}
  gradient_checkpointing: true
  log_every: 1000
  report_to: []
output: {{dir: {out}}}
"""


def write_data(path: Path, rows: int, words: int) -> None:
    """``rows`` plain-text rows of ``words`` random words each (over one World token a word, so a row cut to the
    context fills it: every packed row is exactly ``ctx`` tokens)."""
    import random
    rng = random.Random(0)
    vocab = ["river", "stone", "light", "quiet", "engine", "garden", "paper", "winter", "signal", "harbor",
             "copper", "meadow", "lantern", "orbit", "velvet", "timber", "canyon", "echo", "marble", "thread"]
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def matmul_params(checkpoint: Path, case: str, lora_r: int):
    """(P, P_trainable) for MFU: weights of every Linear (the head included) of the checkpoint's model, built on
    the meta device from its config; and the LoRA matrices on the default targets (r x (in + out) each) where
    the case trains LoRA (the learned state is not a matrix product's weight)."""
    import torch

    from rwkv_peft import versions
    from rwkv_peft.models.rwkv7.configuration_rwkv7 import RWKV7Config
    config = RWKV7Config.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = versions.of(config).causal_lm_class(config)
    targets = versions.of(config).lora_presets["default"]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = sum(m.weight.numel() for m in linears.values())
    lora = sum(lora_r * (m.in_features + m.out_features) for n, m in linears.items()
               if any(n.endswith("." + t) for t in targets)) if "lora" in case else 0
    return total, lora


def run_ours(args) -> dict:
    import torch

    from rwkv_peft.recipe import recipe_from_text
    from rwkv_peft.training.loop import train
    work = Path(args.work)
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"run-{args.case}-"))
    recipe = recipe_from_text(recipe_text(args, args.case, work / "data.jsonl", out), source=f"{args.case}.yaml")
    cuda = args.device != "cpu"
    marks = []

    def on_step(step, loss):
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(recipe, progress=False, log=lambda s: None, on_step=on_step)
    if result.tokens != args.steps * args.batch * args.ctx:  # rows not full: tokens/s would be overstated
        raise SystemExit(f"trained {result.tokens} tokens, not {args.steps} x {args.batch} x {args.ctx}")
    return timings(args, marks)


def run_fla(args) -> dict:
    import torch
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM as FlaModel
    from peft import LoraConfig, get_peft_model

    from rwkv_peft.models.rwkv7.configuration_rwkv7 import RWKV7Config
    ours = RWKV7Config.from_pretrained(args.checkpoint)
    cfg = FlaConfig(hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers, vocab_size=VOCAB,
                    head_dim=ours.head_size, intermediate_size=ours.intermediate_size,
                    decay_low_rank_dim=ours.decay_low_rank, a_low_rank_dim=ours.a_low_rank,
                    v_low_rank_dim=ours.v_low_rank, gate_low_rank_dim=ours.gate_low_rank)
    dev = torch.device(args.device)
    torch.cuda.reset_peak_memory_stats()
    model = FlaModel(cfg).to(dev, torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                             target_modules=LORA_TARGETS_FLA))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    marks = []
    for _ in range(args.steps):
        ids = torch.randint(0, VOCAB, (args.batch, args.ctx), generator=g).to(dev)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # ours clips too (train.grad_clip: 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
    return timings(args, marks)


def timings(args, marks) -> dict:
    import torch
    steps = [b - a for a, b in zip(marks[args.warmup - 1:], marks[args.warmup:])] if args.warmup else []
    step_s = statistics.median(steps) if steps else float("nan")
    cuda = args.device != "cpu"
    return {"step_s": step_s, "tokens_per_s": args.batch * args.ctx / step_s,
            "peak_allocated": torch.cuda.max_memory_allocated() if cuda else 0,
            "peak_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}


def mfu(row: dict) -> float:
    """Model FLOPs utilisation (see the module docstring); NaN where the device's peak is not in PEAK_BF16."""
    peak = next((v for k, v in PEAK_BF16.items() if k in row.get("device", "")), float("nan"))
    flops_per_token = 4 * row["params"] + 2 * row["trainable"]
    return row["tokens_per_s"] * flops_per_token / peak


def run_case_process(args, case: str, ctx: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--one", case, "--checkpoint", str(args.checkpoint), "--work", str(args.work),
           "--ctx", str(ctx), "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--lora-r", str(args.lora_r), "--device", args.device]
    base = {"case": case, "ctx": ctx, "batch": batch}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.timeout} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {**base, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    row = {**base, **json.loads(line[len("RESULT "):])}
    row["params"], row["trainable"] = matmul_params(args.checkpoint, case, args.lora_r)
    row["mfu"] = mfu(row)
    return row


def print_row(r: dict) -> None:
    where = f"{r['case']:>11} ctx {r['ctx']:>5} x{r['batch']}"
    if "error" in r:
        print(f"{where}  ERROR: {r['error']}", flush=True)
        return
    print(f"{where}  {r['tokens_per_s']:>9.0f} tok/s  peak {r['peak_allocated'] / 2**30:6.2f} GiB allocated "
          f"{r['peak_reserved'] / 2**30:6.2f} GiB reserved  MFU {r['mfu']:.1%}  "
          f"({r['trainable'] / 1e6:.1f}M trained of {r['params'] / 1e9:.2f}B in Linear layers)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.5B", choices=sorted(SHAPES))
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--contexts", default="1024x1,4096x2", help="CTXxBATCH pairs (default 1024x1,4096x2)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per case")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=600, help="seconds per case")
    p.add_argument("--json", type=Path, default=Path("bench_train.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--ctx", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.case = args.one
        print("RESULT " + json.dumps(run_fla(args) if args.one == "fla-lora" else run_ours(args)), flush=True)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad or args.warmup < 1 or args.steps <= args.warmup:
        p.error(f"unknown case(s) {bad} (known: {', '.join(CASES)})" if bad else "--steps must exceed --warmup >= 1")
    contexts = [tuple(int(x) for x in c.split("x")) for c in args.contexts.split(",") if c]
    work = Path(tempfile.mkdtemp(prefix="rwkv-bench-train-"))
    args.work, args.checkpoint = work, work / f"random_{args.shape}"
    if args.shape == "tiny":
        write_tiny_checkpoint(args.checkpoint)
    else:
        write_random_checkpoint(args.shape, args.checkpoint)
    write_data(work / "data.jsonl", rows=max(b for _, b in contexts) * args.steps * 2,
               words=max(c for c, _ in contexts))
    rows = []
    for ctx, batch in contexts:
        for case in cases:
            rows.append(run_case_process(args, case, ctx, batch))
            print_row(rows[-1])
    args.json.write_text(json.dumps({"shape": args.shape, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


def write_tiny_checkpoint(folder: Path) -> None:
    """A 2-layer, width-128 random RWKV-7 with the World vocabulary (for a check on the CPU)."""
    import torch

    from rwkv_peft.convert import convert
    from tests.factories import make_blinkdl_v7
    folder.parent.mkdir(parents=True, exist_ok=True)
    pth = folder.parent / "tiny.pth"
    torch.save(make_blinkdl_v7(VOCAB, 128, 2, seed=0), pth)
    convert(pth, folder)


if __name__ == "__main__":
    sys.exit(main())
