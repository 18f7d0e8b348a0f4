#!/usr/bin/env python
"""Real tokens per second of a persona recipe trained on short dialogues: padded rows against packed rows.

The recipe is run as ``rwkv-peft train`` runs it (``rwkv_peft.training.train``: data through ``datasets`` and the
World tokenizer, the recipe's method, batch size, accumulation, ``max_length``, precision and checkpointing), on a
random-weight RWKV-7 of ``--shape`` and synthetic dialogues whose lengths are log-uniform in ``--low``..``--high``
tokens (most short, a few long). Two layouts of the same dialogues, one epoch each:

- padded (``data.pack: false``): a micro-batch is ``batch_size`` dialogues, right-padded to its longest;
- packed (``data.pack: true``, ``pack_state: reset``): a micro-batch is ``batch_size`` rows of up to ``max_length``
  tokens, each holding several dialogues that each start from the initial state.

Before each timed epoch a two-step run of the same layout warms the process up (kernel build or load, allocator,
cuBLAS). Reported per layout: real (non-padding) tokens trained, seconds, real tokens/s, the padding share of the
tokens the model ran (from the micro-batches of that epoch) and, on a GPU, the peak allocated memory.

Usage:
  python scripts/bench_packing.py                  # recipes/rwkv7-0.1b-state-persona.yaml on a tiny model, CPU
  python scripts/bench_packing.py --recipe recipes/rwkv7-1.5b-state-persona.yaml --shape 1.5B --device cuda
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_memory import SHAPES, write_random_checkpoint  # noqa: E402
from bench_train import write_tiny_checkpoint  # noqa: E402

WORDS = ["river", "stone", "light", "quiet", "engine", "garden", "paper", "winter", "signal", "harbor", "copper",
         "meadow", "lantern", "orbit", "velvet", "timber", "canyon", "echo", "marble", "thread"]
LAYOUTS = ("padded", "packed")


def dialogue_lengths(n: int, low: int, high: int, seed: int):
    """Lengths of ``n`` dialogues, log-uniform in [low, high] (most are short, a few long)."""
    rng = random.Random(seed)
    return [int(round(low * (high / low) ** rng.random())) for _ in range(n)]


def write_dialogues(path: Path, lengths, seed: int) -> None:
    """One persona-format row per length: alternating User / Assistant turns of about ``length`` words in all
    (a word of ``WORDS`` is one World token; the chat template adds a few tokens per turn)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for n in lengths:
            turns, left = [], n
            while left > 0 or len(turns) % 2:          # end on an assistant turn
                words = min(max(left, 4), rng.randint(6, 48))
                role = "user" if len(turns) % 2 == 0 else "assistant"
                turns.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(words))})
                left -= words + 4                          # + "User: " / "\n\n" and the like
            f.write(json.dumps({"messages": turns}) + "\n")


def layout_overrides(args, layout: str, checkpoint: Path, data: Path, out: Path, steps=None):
    """``--set`` overrides that turn the recipe into one benchmark run: our model and data, no evaluation,
    checkpoints, samples or logs; one epoch (or ``steps`` optimizer steps)."""
    cuda = args.device != "cpu"
    sets = [f"model.path={checkpoint}", "model.tokenizer=world", f"data.train={data}", "data.eval_split=0",
            f"data.pack={'true' if layout == 'packed' else 'false'}", "data.pack_state=reset",
            "train.epochs=1", "train.eval_every=null", "train.save_every=null", "train.log_every=100000",
            "train.report_to=[]", "eval.prompts=[]", "eval.at_end=false", f"output.dir={out}",
            f"output.run_name={layout}-{'warmup' if steps else 'epoch'}", "output.overwrite=true"]
    if steps:
        sets.append(f"train.max_steps={steps}")
    if not cuda:  # the CPU runs the recipe in fp32 (bf16 matmuls are slow there)
        sets += ["model.dtype=float32", "train.mixed_precision=no"]
    return sets + list(args.set)


def micro_batches(recipe):
    """``(rows, stream)``: the recipe's training rows and micro-batch order, built as the training loop builds
    them (``batch_of(rows, stream.indices(b))`` is micro-batch ``b``)."""
    from rwkv_peft.data import build_datasets
    from rwkv_peft.training.batches import Stream
    from rwkv_peft.training.setup import load_tokenizer
    rows, _ = build_datasets(recipe.data, load_tokenizer(recipe.model, log=lambda s: None), seed=recipe.train.seed,
                             log=lambda s: None)
    return rows, Stream(len(rows), recipe.train.batch_size, 0, 1, recipe.train.seed)


def epoch_tokens(recipe) -> dict:
    """Real tokens and tokens the model runs (padding included) over one epoch of ``recipe``'s micro-batches."""
    from rwkv_peft.training.batches import batch_of
    rows, stream = micro_batches(recipe)
    real = ran = 0
    for b in range(stream.batches_per_epoch):
        batch = batch_of(rows, stream.indices(b))
        real += int(batch["attention_mask"].sum())
        ran += batch["input_ids"].numel()
    lengths = [len(rows[i]["input_ids"]) for i in range(len(rows))]
    return {"rows": len(rows), "micro_batches": stream.batches_per_epoch, "real": real, "ran": ran,
            "row_tokens_min": min(lengths), "row_tokens_max": max(lengths)}


def wkv_pieces(recipe, checkpoint: Path, device: str, repeats: int = 3) -> dict:
    """The WKV-7 op (forward + backward, the dispatched path) on the first packed micro-batch's samples, gathered
    into rows of their own: in one call (every sample padded to the longest) against the pieces the model runs
    (``models.rows.MAX_PIECES``); random inputs of the model's heads, in the recipe's dtype on a GPU."""
    import torch

    from rwkv_peft.models import rows as rows_mod
    from rwkv_peft.models.rwkv7.configuration_rwkv7 import RWKV7Config
    from rwkv_peft.models.rwkv7.modeling_rwkv7 import _wkv
    from rwkv_peft.training.batches import batch_of
    packed, stream = micro_batches(recipe)
    batch = batch_of(packed, stream.indices(0))
    config = RWKV7Config.from_pretrained(checkpoint)
    H, N = config.hidden_size // config.head_size, config.head_size
    (B, T), dev = batch["input_ids"].shape, torch.device(device)
    dtype = getattr(torch, recipe.model.dtype) if device != "cpu" else torch.float32
    starts = rows_mod.sample_starts(B, T, position_ids=batch["position_ids"], device=dev)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, T, H, N, generator=g) for _ in range(5)]
    log_w = -torch.rand(B, T, H, N, generator=g)
    inputs = [t.to(dev, dtype) for t in (x[0], log_w, *x[1:])]          # r, w, k, v, kk, a
    h0 = torch.zeros(H, N, N, device=dev, requires_grad=True)

    def once(max_pieces: int) -> float:
        rows_mod.MAX_PIECES = max_pieces
        ts = []
        for _ in range(repeats + 1):
            args = [t.detach().requires_grad_() for t in inputs]
            _sync(device)
            t0 = time.perf_counter()
            r = rows_mod.Rows.of(batch["attention_mask"].to(dev), starts)
            out, final = r.run_wkv(_wkv, args, None, h0, lambda: torch.zeros(H, N, N, device=dev))
            (out.float().sum() + final.float().sum()).backward()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return min(ts[1:])

    default = rows_mod.MAX_PIECES
    try:
        one, pieces = once(1), once(default)
    finally:
        rows_mod.MAX_PIECES = default
    seg = rows_mod.Segments(starts, batch["attention_mask"].to(dev))
    return {"samples": seg.count, "longest": seg.length, "real": int(batch["attention_mask"].sum()),
            "one_call_s": one, "pieces_s": pieces, "pieces": len(list(seg.pieces()))}


def _sync(device: str) -> None:
    if device != "cpu":
        import torch
        torch.cuda.synchronize()


def timed_run(recipe, cuda: bool) -> dict:
    """Train ``recipe``; real tokens, seconds of the steps and, on a GPU, the peak allocated memory."""
    import torch

    from rwkv_peft.training.loop import train
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = train(recipe, progress=False, log=lambda s: None)
    if cuda:
        torch.cuda.synchronize()
    return {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
            "tokens_per_s": result.tokens / result.seconds,
            "peak_allocated": torch.cuda.max_memory_allocated() if cuda else 0}


def run_layout(args, layout: str, checkpoint: Path, data: Path, work: Path) -> dict:
    from rwkv_peft.recipe import load_recipe
    cuda = args.device != "cpu"
    timed_run(load_recipe(args.recipe, layout_overrides(args, layout, checkpoint, data, work, steps=2)), cuda)
    recipe = load_recipe(args.recipe, layout_overrides(args, layout, checkpoint, data, work))
    return {**epoch_tokens(recipe), **timed_run(recipe, cuda)}


def shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (no absolute local paths in the output)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def print_table(args, rows: dict, op: dict) -> None:
    first = rows["padded"]
    print(f"{shown(args.recipe)} on a random {args.shape} RWKV-7 ({args.device}); {args.samples} dialogues of "
          f"{first['row_tokens_min']}-{first['row_tokens_max']} tokens, {first['real']} real tokens")
    print(f"{'layout':<7} {'micro-batches':>13} {'padding':>8} {'steps':>6} {'seconds':>8} {'real tok/s':>11} "
          f"{'peak GiB':>9}")
    for layout, r in rows.items():
        print(f"{layout:<7} {r['micro_batches']:>13} {1 - r['real'] / r['ran']:>8.1%} {r['steps']:>6} "
              f"{r['seconds']:>8.2f} {r['tokens_per_s']:>11.0f} {r['peak_allocated'] / 2**30:>9.2f}")
    print(f"packed / padded: {rows['packed']['tokens_per_s'] / rows['padded']['tokens_per_s']:.2f}x real tokens/s")
    print(f"WKV op, forward + backward, on the first packed micro-batch ({op['samples']} samples, {op['real']} real "
          f"tokens, the longest {op['longest']}): one call over the samples padded to the longest "
          f"{op['one_call_s'] * 1e3:.1f} ms, in {op['pieces']} pieces {op['pieces_s'] * 1e3:.1f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "rwkv7-0.1b-state-persona.yaml")
    p.add_argument("--shape", default="tiny", choices=["tiny", *sorted(SHAPES)], help="the random model's shape")
    p.add_argument("--samples", type=int, default=96, help="dialogues (one epoch)")
    p.add_argument("--low", type=int, default=24, help="shortest dialogue (tokens, about)")
    p.add_argument("--high", type=int, default=512, help="longest dialogue (tokens, about)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further recipe override for both layouts (repeatable)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cpu":
        import os
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the training loop takes a GPU wherever one is visible
    import datasets
    import transformers
    datasets.disable_progress_bars()                # one table, not a progress bar per map and load
    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="rwkv-bench-packing-"))
    checkpoint = work / f"random_{args.shape}"
    if args.shape == "tiny":
        write_tiny_checkpoint(checkpoint)
    else:
        write_random_checkpoint(args.shape, checkpoint)
    data = work / "dialogues.jsonl"
    write_dialogues(data, dialogue_lengths(args.samples, args.low, args.high, seed=0), seed=0)
    rows = {layout: run_layout(args, layout, checkpoint, data, work) for layout in LAYOUTS}
    from rwkv_peft.recipe import load_recipe
    op = wkv_pieces(load_recipe(args.recipe, layout_overrides(args, "packed", checkpoint, data, work)), checkpoint,
                    args.device)
    print_table(args, rows, op)
    if args.json:
        args.json.write_text(json.dumps({"recipe": shown(args.recipe), "shape": args.shape, "device": args.device,
                                         "samples": args.samples, "low": args.low, "high": args.high,
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "layouts": rows, "wkv_op": op}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
