#!/usr/bin/env python
"""Peak GPU memory of fine-tuning RWKV-7 per method: LoRA, state tuning, LoRA + state; bf16 and NF4 bases.

Shapes (random weights, World vocab 65536; every size comes from RWKV7Config, parameters are counted from the
built model):  0.1B = L12 C768,  0.4B = L24 C1024,  1.5B = L24 C2048,  2.9B = L32 C2560.

Each case runs in its own process (a clean CUDA context and peak counter): the base is loaded through
``rwkv_peft.methods.load_base_model`` (bf16, or NF4 via BitsAndBytesConfig) from a random checkpoint written
once per shape, the method is attached with ``apply_lora`` / ``apply_state_tuning``, and a few AdamW steps run
on batch 1 with gradient checkpointing and the chunked loss (the [T, 65536] logits never exist at once).
Reported: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (what nvidia-smi shows, less the
CUDA context), tokens/s, and the target: 25% under the best public RWKV PEFT tool's numbers (ctx 1024).

    python scripts/bench_memory.py                         # everything (about 10 minutes on an H100)
    python scripts/bench_memory.py --shapes 1.5B --ctx 1024 --methods lora --precisions nf4
    python scripts/bench_memory.py --dry-run               # the plan and parameter counts; no GPU needed
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {"0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "2.9B": (32, 2560)}
METHODS = ("lora", "state", "lora+state")
PRECISIONS = ("bf16", "nf4")
VOCAB = 65536
# the best public RWKV PEFT tool, ctx 1024, batch 1, 24 GB card (its README, GB); our goal is 25% less
PUBLIC_GB = {("1.5B", "lora", "bf16"): 5.6, ("1.5B", "lora", "nf4"): 3.9, ("1.5B", "state", "bf16"): 5.3,
             ("2.9B", "lora", "bf16"): 8.8, ("2.9B", "lora", "nf4"): 5.7}
GOAL = 0.75


def config_for(shape: str):
    from rwkv_peft.models.rwkv7.configuration_rwkv7 import RWKV7Config
    layers, width = SHAPES[shape]
    return RWKV7Config(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers)


def count_params(config) -> int:
    import torch
    from rwkv_peft.models.rwkv7.modeling_rwkv7 import RWKV7ForCausalLM
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


# ---- one case (child process) -----------------------------------------------------------------------------------

def run_case(args) -> dict:
    import torch

    from rwkv_peft.methods import apply_lora, apply_state_tuning, load_base_model, trainable_summary
    from rwkv_peft.ops.wkv7 import select_backend

    dev = torch.device(getattr(args, "device", None) or "cuda:0")
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    quant = "nf4" if args.precision == "nf4" else None
    model = load_base_model(args.checkpoint, dtype="bfloat16", quantization=quant,
                            device_map={"": dev.index or 0} if cuda else "cpu",
                            trainable_initial_state="state" in args.method)
    if "lora" in args.method:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, targets=args.lora_targets)
    if "state" in args.method:
        model = apply_state_tuning(model)
    if args.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    weights_bytes = torch.cuda.memory_allocated() if cuda else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    loss_mode, times, losses = "chunked", [], []
    for step in range(args.steps):
        ids = torch.randint(0, VOCAB, (args.batch, args.ctx), generator=g).to(dev)
        sync()
        t0 = time.perf_counter()
        try:
            out = model(input_ids=ids, labels=ids, return_logits=False, loss_chunk_size=args.loss_chunk_size)
        except TypeError:  # a model without the chunked loss: full logits
            loss_mode = "full"
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    timed = times[1:] or times
    return {
        "shape": args.shape, "method": args.method, "precision": args.precision, "ctx": args.ctx,
        "batch": args.batch, "params": args.params,
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else 0,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else 0, "after_load": weights_bytes,
        "tokens_per_s": args.batch * args.ctx / (sum(timed) / len(timed)), "step_s": timed,
        "loss": losses, "loss_mode": loss_mode, "checkpointing": args.checkpointing, "lora_r": args.lora_r,
        "wkv_path": select_backend(dev)[0], "trainable": trainable_summary(model),
    }


# ---- driver ---------------------------------------------------------------------------------------------------------

def write_random_checkpoint(shape: str, folder: Path) -> None:
    """A random RWKV-7 of ``shape`` in bf16 as one of our HF folders (values in the official init's ranges)."""
    import torch
    from torch import nn

    from rwkv_peft.convert import save_hf_folder
    from rwkv_peft.models.rwkv7.modeling_rwkv7 import RWKV7ForCausalLM

    config = config_for(shape)
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    fills = {"w0": -4.0, "a0": 0.0, "v0": 0.5, "k_k": 0.85, "k_a": 1.0, "r_k": -0.04}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if p.dim() == 2 and leaf == "weight" and "emb" not in name:
                nn.init.normal_(p, std=0.02)              # every Linear, the head included
            elif "emb" in name:
                nn.init.uniform_(p, -1e-4, 1e-4)
            elif leaf in ("weight", "bias") and parent.startswith("ln"):
                p.fill_(1.0 if leaf == "weight" else 0.0)  # LayerNorms and ln_x
            elif leaf.startswith("x_"):
                p.fill_(0.5)
            elif leaf in fills:
                p.fill_(fills[leaf])
            else:
                p.zero_()
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_hf_folder(config, sd, folder, tokenizer=False)


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def print_table(rows) -> None:
    head = (f"{'shape':>5} {'params':>7} {'method':>10} {'prec':>4} {'ctx':>5} {'peak alloc GB':>13} "
            f"{'peak resv GB':>12} {'tok/s':>8}  target (25% under public)")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>5} {'':>7} {r['method']:>10} {r['precision']:>4} {r['ctx']:>5}  ERROR: {r['error']}")
            continue
        public = PUBLIC_GB.get((r["shape"], r["method"], r["precision"]))
        target = ""
        if public is not None:
            goal = GOAL * public * 1e9
            target = (f"{'PASS' if r['peak_reserved'] <= goal else 'FAIL'} <= {goal / 1e9:.2f} GB "
                      f"(public {public} GB at ctx 1024)")
        print(f"{r['shape']:>5} {r['params'] / 1e9:>6.2f}B {r['method']:>10} {r['precision']:>4} {r['ctx']:>5} "
              f"{fmt_gb(r['peak_allocated']):>13} {fmt_gb(r['peak_reserved']):>12} {r['tokens_per_s']:>8.0f}  {target}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--ctx", default="1024,4096", help="context lengths (default 1024,4096)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="bf16 and/or nf4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per case (peak is over all of them)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-targets", default="default", help="LoRA target preset (default: default)")
    p.add_argument("--loss-chunk-size", type=int, default=1024, help="tokens per chunk of the loss")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="turn gradient checkpointing off")
    p.add_argument("--json", default="bench_memory.json", help="where to write the results (default "
                                                                 "bench_memory.json)")
    p.add_argument("--work-dir", help="where the random checkpoints go (default: a temporary folder)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--dry-run", action="store_true", help="print the plan and parameter counts; needs no GPU")
    # internal: one case in this process
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        args.ctx = int(args.ctx)
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    ctxs = [int(c) for c in args.ctx.split(",") if c.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
    for x in precisions:
        if x not in PRECISIONS:
            p.error(f"--precisions: unknown precision {x!r} (known: {', '.join(PRECISIONS)})")

    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_memory.py measures peak GPU memory and needs a CUDA GPU; none is available here "
              "(use --dry-run to print the plan).", file=sys.stderr)
        return 1

    params = {s: count_params(config_for(s)) for s in shapes}
    cases = [(s, m, x, c) for s in shapes for x in precisions for m in methods for c in ctxs]
    if args.dry_run:
        for s in shapes:
            print(f"{s}: {config_for(s).describe()} - {params[s]:,} parameters (counted from the model)")
        print(f"{len(cases)} cases: " + ", ".join(f"{s}/{m}/{x}/ctx{c}" for s, m, x, c in cases))
        return 0

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rwkv-bench-mem-"))
    rows = []
    try:
        for s in shapes:
            ckpt = work / f"random_{s}"
            if not (ckpt / "config.json").is_file():
                print(f"writing a random {s} checkpoint to {ckpt} ...", flush=True)
                write_random_checkpoint(s, ckpt)
            for x in precisions:
                for m in methods:
                    for c in ctxs:
                        cmd = [sys.executable, __file__, "--one", "--checkpoint", str(ckpt), "--shape", s,
                               "--method", m, "--precision", x, "--ctx", str(c), "--batch", str(args.batch),
                               "--steps", str(args.steps), "--lora-r", str(args.lora_r), "--lora-targets",
                               args.lora_targets, "--loss-chunk-size", str(args.loss_chunk_size),
                               "--params", str(params[s])] + ([] if args.checkpointing else ["--no-checkpointing"])
                        try:
                            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                            if line is None:
                                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                                row = {"shape": s, "method": m, "precision": x, "ctx": c, "error": err[:200]}
                            else:
                                row = json.loads(line[len("RESULT "):])
                        except subprocess.TimeoutExpired:
                            row = {"shape": s, "method": m, "precision": x, "ctx": c,
                                   "error": f"timed out after {args.timeout} s"}
                        rows.append(row)
                        print_table([row])
            if not args.work_dir:
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows)
    meta = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "python": platform.python_version(), "goal": f"{GOAL} x public",
            "public_gb_ctx1024": {"/".join(k): v for k, v in PUBLIC_GB.items()}}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\nwrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
