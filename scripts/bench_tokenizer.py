#!/usr/bin/env python
"""Benchmark the RWKV World tokenizer backends: encode and decode speed in MB/s (MB = 10^6 bytes of UTF-8 text).

Generates a deterministic mixed text (English-like prose, Chinese and Japanese, emoji with modifiers and ZWJ
sequences, Python/JS code, runs of spaces, tabs, newlines and \\r\\n), then times, at each size:

  official        rwkv.rwkv_tokenizer.TRIE_TOKENIZER (pure Python, the reference)
  fallback        rwkv_peft's GreedyByteEncoder (pure Python; fresh, so its memo starts empty)
  pyrwkv          pyrwkv_tokenizer.RWKVTokenizer, raw (if installed)
  class[...]      RWKVWorldTokenizer end to end, per backend: __call__ on the whole text, __call__ on a batch of
                  ~2 KB documents, and encode_batch on the same documents; decode() for decoding

Every encoder's ids are checked against the official tokenizer's (the script fails on any difference).

    python scripts/bench_tokenizer.py --sizes 1 20 --json bench_tokenizer.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can said who what up out about "
    "into them than then some could time only other new these two may first any like now my over such our man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three states himself few house use during without again place American around however home "
    "small found Mrs thought went say part once general high upon school every don't does got united left number "
    "course war until always away something fact though water less public put think almost hand enough far took head "
    "yet government system better set told nothing night end why called didn't eyes find going look asked later knew "
    "tokenizer gradient embedding recurrent attention transformer parameters checkpoint"
).split()
CJK = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年"
    "生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当"
    "起与好看学进种将还分此心前面又定见只主没公从知使情明性全长因"
    "ひらがなとカタカナのテキストです。東京は日本の首都です。"
)
EMOJI = ["😀", "🎉", "🚀", "👍🏽", "❤️", "👨‍👩‍👧", "🏳️‍🌈", "🤖", "✨", "🔥"]
CODE = [
    "def {n}(x, y=None):\n    if y is None:\n        return x * {k}\n    return {{'x': x, 'y': y}}\n\n",
    "for (let i = 0; i < {k}; i++) {{\n\tconsole.log(`{n}: ${{i}}`);\n}}\r\n",
    "class {n}(Base):\n    \"\"\"Docstring for {n}.\"\"\"\n    value: int = {k}\n",
    "SELECT {n}, COUNT(*) FROM t WHERE id > {k} GROUP BY {n};\n",
]


def mixed_text(nbytes: int, seed: int = 0) -> str:
    """Deterministic mixed text of at least ``nbytes`` UTF-8 bytes."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) for r in range(len(WORDS))]  # Zipf-like word frequencies
    parts: list[str] = []
    size = 0
    while size < nbytes:
        k = rng.random()
        if k < 0.55:
            words = rng.choices(WORDS, weights, k=rng.randint(6, 40))
            words[0] = words[0].capitalize()
            s = " ".join(words) + rng.choice([". ", ", ", "! ", "? ", ".\n", ".\n\n"])
        elif k < 0.72:
            s = "".join(rng.choice(CJK) for _ in range(rng.randint(4, 60))) + rng.choice(["。", "，", "！", "\n"])
        elif k < 0.77:
            s = "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4))) + " "
        elif k < 0.92:
            s = rng.choice(CODE).format(n=f"f_{rng.randint(0, 999)}", k=rng.randint(0, 99))
        else:
            s = rng.choice([" ", "\t", "\n", "\r\n", "  "]) * rng.randint(1, 120)
        parts.append(s)
        size += len(s.encode("utf-8"))
    return "".join(parts)


def split_docs(text: str, target: int = 2000) -> list[str]:
    docs, start = [], 0
    while start < len(text):
        end = min(len(text), start + target)
        nl = text.find("\n", end)
        end = len(text) if nl < 0 else nl + 1
        docs.append(text[start:end])
        start = end
    return docs


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.platform()


def timed(fn, repeat: int):
    """Best wall-clock time of ``repeat`` runs, with the process CPU time of that run (all threads)."""
    best, result = (float("inf"), float("inf")), None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best = min(best, (wall, cpu))
    return best, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 20.0], help="text sizes in MB (default: 1 20)")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement, best is kept (default 1)")
    ap.add_argument("--skip-official", action="store_true", help="skip the slow official tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before the run (1/5/15 min): {load_before}", flush=True)

    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_peft.tokenization import GreedyByteEncoder, RWKVWorldTokenizer, load_world_vocab
    from rwkv_peft.tokenization.tokenization_rwkv_world import DEFAULT_VOCAB_FILE

    try:
        import pyrwkv_tokenizer
    except ImportError:
        pyrwkv_tokenizer = None

    official_vocab = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")
    official = None if args.skip_official else TRIE_TOKENIZER(official_vocab)
    table = load_world_vocab()
    tokenizers = {"python": RWKVWorldTokenizer(encoder_backend="python")}
    if pyrwkv_tokenizer is not None:
        tokenizers["pyrwkv"] = RWKVWorldTokenizer(encoder_backend="pyrwkv")
        raw_pyrwkv = pyrwkv_tokenizer.RWKVTokenizer(vocab_filepath=DEFAULT_VOCAB_FILE)
    for tok in tokenizers.values():  # build the encoders now (they are created lazily), outside the timings
        tok("warm up")
        tok.decode([1])

    rows = []

    def record(size_mb, name, op, nbytes, times, ntokens):
        wall, cpu = times
        rows.append(
            {
                "size_mb": size_mb,
                "backend": name,
                "op": op,
                "bytes": nbytes,
                "tokens": ntokens,
                "seconds": round(wall, 4),
                "cpu_seconds": round(cpu, 4),
                "mb_per_s": round(nbytes / 1e6 / wall, 2),
                "mb_per_cpu_s": round(nbytes / 1e6 / max(cpu, 1e-9), 2),
            }
        )
        print(
            f"  {name:<36} {op:<7} {nbytes / 1e6 / wall:9.2f} MB/s wall  {nbytes / 1e6 / max(cpu, 1e-9):9.2f} MB/s cpu",
            flush=True,
        )

    for size in args.sizes:
        text = mixed_text(int(size * 1e6), seed=args.seed)
        data = text.encode("utf-8")
        docs = split_docs(text)
        doc_bytes = sum(len(d.encode("utf-8")) for d in docs)
        n = len(data)
        print(f"\n== {n / 1e6:.2f} MB of mixed text, {len(docs)} documents ==", flush=True)

        reference = None
        if official is not None:
            sec, reference = timed(lambda: official.encode(text), args.repeat)
            record(size, "official TRIE_TOKENIZER", "encode", n, sec, len(reference))
            sec, back = timed(lambda: official.decode(reference), args.repeat)
            assert back == text
            record(size, "official TRIE_TOKENIZER", "decode", n, sec, len(reference))

        def check(ids, what):
            nonlocal reference
            if reference is None:
                reference = ids
            elif ids != reference:
                raise SystemExit(f"{what}: ids differ from the reference")

        enc = GreedyByteEncoder(table)  # fresh: empty memo
        sec, ids = timed(lambda: enc.encode(text), 1)
        check(ids, "fallback")
        record(size, "fallback GreedyByteEncoder (cold)", "encode", n, sec, len(ids))
        sec, ids = timed(lambda: enc.encode(text), args.repeat)
        record(size, "fallback GreedyByteEncoder (warm)", "encode", n, sec, len(ids))

        if pyrwkv_tokenizer is not None:
            sec, ids = timed(lambda: raw_pyrwkv.encode(text), args.repeat)
            check(ids, "pyrwkv")
            record(size, "pyrwkv raw", "encode", n, sec, len(ids))
            sec, back = timed(lambda: raw_pyrwkv.decode(ids), args.repeat)
            assert back == text
            record(size, "pyrwkv raw", "decode", n, sec, len(ids))

        doc_reference = None
        for name, tok in tokenizers.items():
            label = f"class[{name}]"
            sec, out = timed(lambda: tok(text)["input_ids"], args.repeat)
            check(out, label)
            record(size, f"{label} __call__(text)", "encode", n, sec, len(out))
            sec, out = timed(lambda: tok(docs)["input_ids"], args.repeat)
            doc_reference = doc_reference or out
            if out != doc_reference:
                raise SystemExit(f"{label} batch: ids differ")
            record(size, f"{label} __call__(docs)", "encode", doc_bytes, sec, sum(map(len, out)))
            sec, out = timed(lambda: tok.encode_batch(docs), args.repeat)
            if out != doc_reference:
                raise SystemExit(f"{label} encode_batch: ids differ")
            record(size, f"{label} encode_batch(docs)", "encode", doc_bytes, sec, sum(map(len, out)))
            sec, back = timed(lambda: tok.decode(reference), args.repeat)
            assert back == text
            record(size, f"{label} decode", "decode", n, sec, len(reference))

    print("\n| size | backend | op | MB/s (wall) | MB/s (CPU time) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_mb']:g} MB | {r['backend']} | {r['op']} | {r['mb_per_s']:.1f} | {r['mb_per_cpu_s']:.1f} |")

    if args.json:
        meta = {
            "date": started,
            "machine": f"{cpu_name()}, {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()})",
            "python": platform.python_version(),
            "pyrwkv_tokenizer": getattr(pyrwkv_tokenizer, "__version__", None) if pyrwkv_tokenizer else None,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
