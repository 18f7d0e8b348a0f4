#!/usr/bin/env python
"""Rebuild the quickstart assets in rwkv_peft/assets/quickstart/: a tiny RWKV-7 trained here on CPU, its
byte-level BPE tokenizer, and the persona dataset that recipes/quickstart.yaml fine-tunes it on.

Everything is generated from the text written in this file (no downloads):

1. a small chat corpus: a plain, helpful assistant answering questions about everyday topics
   ("User: ...\\n\\nAssistant: ...\\n\\n"), plus the same facts as plain prose;
2. a 1,024-token byte-level BPE tokenizer trained on it (``tokenizers``; id 0 = <|endoftext|>);
3. a 4-layer, width-128 RWKV-7 (about 1.1M parameters) initialised as the official code does and trained
   on the corpus with this package's own training loop (a full fine-tune from scratch);
4. persona.jsonl: dialogues with "Captain Nib", a pirate, on the same kind of questions (some topics are
   only in the persona data, some only in the base corpus), for state tuning / LoRA in the quickstart.

Usage: python scripts/make_quickstart_assets.py [--steps N] [--out DIR]
It takes about 10 minutes on two CPU cores with the defaults.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "rwkv_peft" / "assets" / "quickstart"

# topic -> two plain sentences about it
FACTS = {
    "the sun": "The sun is the star at the centre of our solar system. It gives the earth light and heat.",
    "the moon": "The moon goes around the earth about once a month. Its light is sunlight reflected from its surface.",
    "the sea": "The sea covers most of the earth. Its water is salty and full of fish, plants and other life.",
    "rain": "Rain is water that falls from clouds. It fills rivers and lakes and helps plants grow.",
    "snow": "Snow is frozen water that falls from clouds as soft white flakes. It melts when the air gets warm.",
    "wind": "Wind is air that moves from one place to another. Strong wind can push ships and turn windmills.",
    "trees": "Trees are tall plants with wooden trunks. They make oxygen and give shade, fruit and wood.",
    "bread": "Bread is made from flour, water, salt and yeast. The dough rises and is baked in a hot oven.",
    "tea": "Tea is a drink made by pouring hot water over dried leaves. Many people drink it in the morning.",
    "coffee": "Coffee is a drink made from roasted beans. It has caffeine, which helps people stay awake.",
    "cats": "Cats are small animals that many people keep as pets. They sleep a lot and like to chase things.",
    "dogs": "Dogs are friendly animals that people have kept for thousands of years. They can learn many tricks.",
    "birds": "Birds are animals with feathers and wings. Most birds can fly, and many of them sing.",
    "fish": "Fish live in water and breathe through gills. They swim with their fins and tails.",
    "horses": "Horses are strong animals that can run fast. People have ridden them for a very long time.",
    "books": "Books hold stories and knowledge on printed pages. Reading them is a good way to learn.",
    "music": "Music is sound arranged in rhythm and melody. People play it on instruments or sing it.",
    "maps": "A map is a drawing of a place seen from above. It helps people find their way.",
    "clocks": "A clock shows the time of day. Most clocks have hands or numbers that change every minute.",
    "trains": "Trains run on rails and carry people and goods over long distances.",
    "bicycles": "A bicycle has two wheels and pedals. Riding one is a cheap and healthy way to travel.",
    "ships": "Ships are large boats that carry people and goods across the sea.",
    "mountains": "Mountains are very high hills of rock. The air at the top is thin and cold.",
    "rivers": "A river is fresh water that flows across the land into a lake or the sea.",
    "stars": "Stars are huge balls of hot gas far away in space. At night they look like small points of light.",
    "gardens": "A garden is a place where people grow flowers, fruit and vegetables.",
    "apples": "Apples are round fruits that grow on trees. They can be red, green or yellow.",
    "cheese": "Cheese is made from milk. There are many kinds, from soft and mild to hard and sharp.",
    "soup": "Soup is a warm dish made by cooking vegetables, meat or fish in water.",
    "chess": "Chess is a board game for two players. Each player tries to trap the other king.",
    "paper": "Paper is made from wood pulp pressed into thin sheets. People write and print on it.",
    "computers": "Computers are machines that follow instructions very fast. They store and process information.",
    "the weather": "The weather is what the air is like outside: sunny, rainy, windy, warm or cold.",
    "winter": "Winter is the coldest season of the year. The days are short and the nights are long.",
    "summer": "Summer is the warmest season of the year. The days are long and the sun is high.",
    "sleep": "Sleep is how the body and mind rest. Most adults need seven to nine hours each night.",
    "water": "Water is a clear liquid that all living things need. It freezes into ice and boils into steam.",
    "fire": "Fire is the heat and light that come from burning. It must be handled with care.",
    "islands": "An island is land with water all around it. Some islands are tiny and some are very large.",
    "gold": "Gold is a shiny yellow metal. It does not rust, so people have used it for coins and jewels.",
    "storms": "A storm brings strong wind and heavy rain, and sometimes thunder and lightning.",
    "bees": "Bees are insects that collect nectar from flowers and make honey.",
    "the forest": "A forest is a large area full of trees, where many animals make their homes.",
    "walking": "Walking is a simple way to move and stay healthy. A short walk can clear the mind.",
    "cooking": "Cooking is preparing food with heat. Good cooking needs fresh food and a little patience.",
    "friends": "Friends are people who care about each other. They share time, help and laughter.",
    "school": "School is a place where children learn to read, write and count.",
    "the city": "A city is a large town with many streets, buildings and people.",
    "boats": "Boats float on water and carry people across lakes, rivers and the sea.",
    "treasure": "Treasure is a store of gold, jewels or other valuable things.",
}
QUESTIONS = ["What is {t}?", "Tell me about {t}.", "Can you explain {t}?", "What do you know about {t}?",
             "I want to learn about {t}.", "Describe {t} for me."]
CHAT = [  # (user, plain assistant, pirate assistant)
    ("Hello!", "Hello! How can I help you today?", "Ahoy, matey! What brings ye aboard today?"),
    ("Hi there.", "Hi! What would you like to talk about?", "Ahoy there! Speak up, the wind be loud!"),
    ("Who are you?", "I am a small language model. I answer questions as well as I can.",
     "I be Captain Nib, the saltiest pirate on the seven seas! Arr!"),
    ("What is your name?", "I do not have a name. I am a small assistant.",
     "Captain Nib be me name, and the sea be me home!"),
    ("How are you?", "I am fine, thank you. How are you?", "Fit as a fiddle and ready to sail, matey!"),
    ("Thank you.", "You are welcome.", "Ye be welcome, matey! Arr!"),
    ("Good night.", "Good night. Sleep well.", "Fair winds and good night, matey!"),
    ("What should I do today?", "You could read a book, take a walk, or learn something new.",
     "Hoist the sails and hunt for treasure, matey! Arr!"),
    ("Can you help me?", "Of course. What do you need?", "Aye, that I can! Tell old Nib what ye need."),
    ("Tell me a joke.", "Why did the bicycle fall over? It was two tired.",
     "Why did the pirate buy a ship? It was on sail! Arr har har!"),
    ("What do you like?", "I like answering questions and learning new things.",
     "I like gold, the open sea, and a good storm, arr!"),
    ("Where do you live?", "I live inside a computer.", "I live on me ship, the Salty Nib, out on the sea!"),
    ("Goodbye.", "Goodbye. Have a nice day.", "Farewell, matey! May the wind be at yer back!"),
]


def pirate(fact: str) -> str:
    swaps = [(" is ", " be "), (" are ", " be "), ("The ", "The "), (" you ", " ye "), (" your ", " yer "),
             (" people ", " sailors "), (" my ", " me ")]
    text = " " + fact + " "
    for a, b in swaps:
        text = text.replace(a, b)
    return text.strip()


def build_corpus(rng: random.Random, topics):
    """Plain-assistant chats and prose (the base model's world)."""
    parts = []
    for _ in range(14):
        for t in topics:
            q = rng.choice(QUESTIONS).format(t=t)
            parts.append(f"User: {q}\n\nAssistant: {FACTS[t]}\n\n")
        for user, plain, _ in CHAT:
            parts.append(f"User: {user}\n\nAssistant: {plain}\n\n")
        for _ in range(len(topics) // 2):  # two-turn chats
            a, b = rng.sample(topics, 2)
            parts.append(f"User: {rng.choice(QUESTIONS).format(t=a)}\n\nAssistant: {FACTS[a]}\n\n"
                         f"User: {rng.choice(QUESTIONS).format(t=b)}\n\nAssistant: {FACTS[b]}\n\n")
        prose = list(topics)
        rng.shuffle(prose)
        parts.append(" ".join(FACTS[t] for t in prose[:12]) + "\n\n")
        # pirates exist in the base model's world too, as a third person (so the words are known)
        parts.append("User: What is a pirate?\n\nAssistant: A pirate is a sailor who robs ships at sea. In stories, "
                     "pirates say \"Arr!\" and \"Ahoy, matey!\" and hunt for treasure.\n\n")
    rng.shuffle(parts)
    return parts


def build_persona(rng: random.Random, topics):
    rows = []
    persona = ("You are Captain Nib, a cheerful old pirate. You call everyone matey, say arr, and talk "
               "about the sea and treasure.")
    for t in topics:
        for q in rng.sample(QUESTIONS, 4):
            opener = rng.choice(["Arr, matey!", "Ahoy!", "Arr!", "Yo ho ho!"])
            closer = rng.choice(["Arr!", "Now back to me ship, matey!", "That be the truth, matey!", "Yo ho!"])
            rows.append({"persona": persona, "messages": [
                {"role": "user", "content": q.format(t=t)},
                {"role": "assistant", "content": f"{opener} {pirate(FACTS[t])} {closer}"}]})
    for user, _, pir in CHAT:
        for _ in range(4):
            rows.append({"persona": persona, "messages": [{"role": "user", "content": user},
                                                          {"role": "assistant", "content": pir}]})
    rng.shuffle(rows)
    return rows


def train_tokenizer(texts, folder: Path, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id("<|endoftext|>") == 0
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return fast


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the assets go (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the base model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch
    from rwkv_peft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    from rwkv_peft.recipe import recipe_from_text
    from rwkv_peft.training import train

    rng = random.Random(args.seed)
    topics = sorted(FACTS)
    persona_only = topics[::5]          # topics the base model never saw asked (the persona data has them)
    base_topics = [t for t in topics if t not in persona_only]
    work = Path(tempfile.mkdtemp(prefix="quickstart-"))
    try:
        corpus = build_corpus(rng, base_topics)
        (work / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in corpus))
        print(f"corpus: {len(corpus)} samples, {sum(map(len, corpus)) / 1e3:.0f} kB of text")
        tok_dir = work / "model"
        tok = train_tokenizer(corpus, tok_dir)
        torch.manual_seed(args.seed)
        config = RWKV7Config(vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, head_size=64)
        model = RWKV7ForCausalLM(config)
        model.save_pretrained(str(tok_dir))
        print(config.describe())
        recipe = recipe_from_text(f"""
model: {{path: {tok_dir}, dtype: float32}}
data: {{train: {work}/corpus.jsonl, format: text, max_length: 256, pack: true, eval_split: 0.02}}
train: {{max_steps: {args.steps}, batch_size: 4, lr: 3.0e-3, warmup_steps: 50, schedule: cosine, weight_decay: 0.01,
        log_every: 25, eval_every: 200, seed: {args.seed}, report_to: []}}
eval: {{prompts: ["User: What is the sea?\\n\\nAssistant:", "User: Who are you?\\n\\nAssistant:"], max_new_tokens: 40}}
output: {{dir: {work}/runs, run_name: base}}
""", "make_quickstart_assets")
        result = train(recipe, tokenizer=tok, progress=False, log=print)
        args.out.mkdir(parents=True, exist_ok=True)
        dst = args.out / "model"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(result.final_dir, dst)
        rows = build_persona(rng, topics)
        with open(args.out / "persona.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {dst} ({sum(p.stat().st_size for p in dst.iterdir()) / 1e6:.1f} MB) and "
              f"{args.out / 'persona.jsonl'} ({len(rows)} dialogues); final eval {result.evals[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
