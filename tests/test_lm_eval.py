"""``rwkv-peft eval RECIPE --tasks ...``: lm-evaluation-harness tasks through its Hugging Face backend on our
models, base and fine-tuned side by side; the numbers equal a direct computation with our model. The tasks are
YAML files written here over local jsonl files (nothing is downloaded); the model is the tiny one that ships with
the package (its own 1,024-token tokenizer)."""
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from transformers import AutoTokenizer  # noqa: E402

from rwkv_peft.cli import main  # noqa: E402
from rwkv_peft.methods import apply_state_tuning, load_adapter, load_base_model, save_adapter  # noqa: E402
from rwkv_peft.recipe import resolve_path  # noqa: E402

QS = "assets:quickstart/model"
MC = [  # multiple choice: the gold answer is not always the first one
    {"question": "User: What is bread made from?\n\nAssistant: Bread is made from", "choices": ["flour", "stone",
                                                                                             "music"], "label": 0},
    {"question": "User: What color is the sky?\n\nAssistant: The sky is", "choices": ["loud", "blue"], "label": 1},
    {"question": "User: Tell me about trains.\n\nAssistant: Trains run on", "choices": ["clouds", "tracks",
                                                                                       "soup"], "label": 1},
    {"question": "User: Who are you?\n\nAssistant: I am", "choices": ["a helpful assistant", "a rock"], "label": 0},
    {"question": "User: What do cows eat?\n\nAssistant: Cows eat", "choices": ["grass", "metal"], "label": 0},
]
LL = [  # loglikelihood of a continuation (lambada-like): perplexity and greedy accuracy
    {"context": "User: What is bread made from?\n\nAssistant: Bread is made from flour, water, salt and",
     "target": " yeast"},
    {"context": "User: Tell me about trains.\n\nAssistant: Trains run on", "target": " tracks"},
    {"context": "User: What do you like to eat?\n\nAssistant: I like to eat", "target": " fresh bread"},
]  # no request here shares its tokens with one of MC's (lm-eval 0.4.13's logits cache mixes up such pairs when
#    their context / continuation split differs)


def _task_yaml(name, data, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(recipe, tasks folder, adapter folder): a recipe on the shipped model, two local tasks, a state adapter."""
    d = tmp_path_factory.mktemp("lmeval")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (d / "ll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LL))
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(_task_yaml("tiny_mc", d / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (tasks / "tiny_ll.yaml").write_text(_task_yaml("tiny_ll", d / "ll.jsonl", (
        "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n")))
    (d / "train.jsonl").write_text('{"text": "hello"}\n')
    recipe = d / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {QS}\n  dtype: float32\ndata:\n  train: {d / 'train.jsonl'}\n"
                      f"output:\n  dir: {d / 'outputs'}\n")
    model = apply_state_tuning(load_base_model(QS, dtype="float32"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.model.blocks:
            m.att.time_state.copy_(torch.randn(m.att.time_state.shape, generator=g) * 2.0)
    save_adapter(model, d / "adapter")
    return recipe, tasks, d / "adapter"


@torch.no_grad()
def _loglikelihood(model, tok, context, continuation):
    """log P(continuation | context), summed over its tokens; the pair tokenized as lm-eval's HF backend does it
    (the whole text, then the context's tokens cut off the front), from one forward pass of our model."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    assert whole[:len(ctx)] == ctx  # the boundary is a token boundary in these examples
    cont = whole[len(ctx):]
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    lls = [logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)]
    greedy = all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    return float(sum(lls)), greedy


def _by_hand(model, tok):
    acc = acc_norm = 0.0
    for doc in MC:
        lls = [_loglikelihood(model, tok, doc["question"], " " + c)[0] for c in doc["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += max(range(len(lls)), key=normed.__getitem__) == doc["label"]
    lls, greedy = zip(*(_loglikelihood(model, tok, d["context"], d["target"]) for d in LL))
    return {"tiny_mc": {"acc": acc / len(MC), "acc_norm": acc_norm / len(MC)},
            "tiny_ll": {"perplexity": math.exp(-sum(lls) / len(lls)), "acc": sum(greedy) / len(LL)}}


def test_base_and_adapter_side_by_side_equal_a_direct_computation(setup, capsys):
    recipe, tasks, adapter = setup
    assert main(["eval", str(recipe), "--tasks", "tiny_mc,tiny_ll", "--include-path", str(tasks),
                 "--adapter", str(adapter), "--json", "--batch-size", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in result["rows"]] == [f"{QS} (base)", str(adapter)]

    tok = AutoTokenizer.from_pretrained(str(resolve_path(QS)))
    base = load_base_model(QS, dtype="float32")
    want = [_by_hand(base, tok), _by_hand(load_adapter(load_base_model(QS, dtype="float32"), str(adapter)), tok)]
    for row, expected in zip(result["rows"], want):
        got = row["results"]
        assert got["tiny_mc"]["acc"]["value"] == expected["tiny_mc"]["acc"]
        assert got["tiny_mc"]["acc_norm"]["value"] == expected["tiny_mc"]["acc_norm"]
        assert got["tiny_ll"]["acc"]["value"] == expected["tiny_ll"]["acc"]
        assert got["tiny_ll"]["perplexity"]["value"] == pytest.approx(expected["tiny_ll"]["perplexity"], rel=1e-4)
    assert want[0]["tiny_ll"]["perplexity"] != pytest.approx(want[1]["tiny_ll"]["perplexity"], rel=1e-2)


def test_the_table_one_task_file_limit_and_errors(setup, capsys, monkeypatch):
    recipe, tasks, adapter = setup
    # one task file: its task runs; the table has a row per model and a column per metric
    assert main(["eval", str(recipe), "--include-path", str(tasks / "tiny_mc.yaml"), "--adapter", str(adapter),
                 "--limit", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "| model | tiny_mc acc | tiny_mc acc_norm |" and out[1] == "|---|---|---|"
    assert out[2].startswith(f"| {QS} (base) | ") and out[3].startswith(f"| {adapter} | ") and len(out) == 4
    assert all(cell.strip() in ("0.0000", "0.5000", "1.0000") for line in out[2:] for cell in line.split("|")[2:-1])

    # an unknown task fails before any model is loaded, naming it and close matches (lm-eval's index of its
    # ~15k built-in tasks, which a name not found in --include-path brings in, is left out here: ~10 s)
    import lm_eval.tasks
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: real(**{**kw, "include_defaults": False}))
    assert main(["eval", str(recipe), "--tasks", "tiny_mcq", "--include-path", str(tasks), "--base"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'tiny_mcq'" in err and "tiny_mc" in err
    assert main(["eval", str(recipe), "--tasks", "tiny_mc", "--include-path", str(tasks / "nope"), "--base"]) == 2
    assert "--include-path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(recipe), "--tasks", "tiny_mc", "--limit", "0", "--base"])
    assert "--limit: '0': expected a positive number" in capsys.readouterr().err
