"""Loading every kind of source, bad rows (skip / fail with row numbers), caching, num_proc, packing."""
import json

import pytest

from rwkv_peft.data import DataError, build_datasets, collate, load_source, pack_dataset, shifted_targets
from rwkv_peft.data.packing import IGNORE, chunk_spans, pack_samples
from rwkv_peft.recipe import DataSection
from tests.training.helpers import chat_rows, write_jsonl


def cfg(train, tmp_path, **kw):
    return DataSection(train=str(train), cache_dir=str(tmp_path / "cache"), max_length=kw.pop("max_length", 256),
                       **kw)


def quiet(*a, **k):
    logs = []
    return logs, (lambda m: logs.append(m))


def test_local_file_kinds(tmp_path, tok):
    import datasets
    rows = [{"text": f"line {i}"} for i in range(6)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    (tmp_path / "a.txt").write_text("".join(r["text"] + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:2])}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", rows[:3])
    write_jsonl(folder / "part2.jsonl", rows[3:])
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "a.txt", "saved", "saved_dict", "folder"):
        ds = load_source(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
        assert len(ds) == 6 and sorted(ds["text"]) == sorted(r["text"] for r in rows), name
    ds = load_source([str(tmp_path / "a.jsonl"), str(folder / "part1.jsonl")], cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 9
    with pytest.raises(DataError, match="no split 'test'"):
        load_source(str(tmp_path / "saved_dict"), split="test")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        load_source(str(tmp_path / "x.xlsx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files in this folder"):
        load_source(str(tmp_path / "empty"))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="taken as a hub dataset name, but the hub is off"):
        load_source("someone/some-dataset")


def test_bad_rows_fail_or_skip_with_row_numbers(tmp_path, tok):
    rows = chat_rows(6)
    rows[2] = {"messages": [{"role": "user", "content": "only a question"}]}
    rows[4] = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c.jsonl row 3: no assistant message .*and 1 more malformed.*on_bad_row: skip"):
        build_datasets(cfg(f, tmp_path, format="chat"), tok, log=lambda m: None)
    logs, log = quiet()
    train, ev = build_datasets(cfg(f, tmp_path, format="chat", on_bad_row="skip"), tok, log=log)
    assert len(train) == 4 and ev is None
    assert any("skipping 2 malformed row(s) of 6" in m and "row 5: message 1: role 'wizard'" in m for m in logs)


def test_invalid_json_lines_are_reported_by_line(tmp_path, tok):
    lines = [json.dumps(r) for r in chat_rows(4)]
    lines.insert(2, '{"messages": [oops')
    lines.insert(4, json.dumps({"messages": "a string, not a list"}))
    f = tmp_path / "broken.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3: invalid JSON"):
        build_datasets(cfg(f, tmp_path, format="chat"), tok, log=lambda m: None)
    logs, log = quiet()
    train, _ = build_datasets(cfg(f, tmp_path, format="chat", on_bad_row="skip"), tok, log=log)
    assert len(train) == 4
    assert any("line 3: invalid JSON" in m and "line 5: field 'messages' is text" in m for m in logs)


def test_truncation_eval_split_and_cache(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * (10 + i)} for i in range(20)])
    c = cfg(f, tmp_path, format="text", max_length=16, eval_split=0.25)
    logs, log = quiet()
    train, ev = build_datasets(c, tok, seed=1, log=log)
    assert len(train) == 15 and len(ev) == 5
    assert max(len(r) for r in train["input_ids"]) == 16
    assert any("longer than data.max_length=16" in m for m in logs)
    # a second build reuses datasets' cache files (same fingerprint), a different tokenizer setting does not
    train2, _ = build_datasets(c, tok, seed=1, log=lambda m: None)
    assert train2.cache_files and train2.cache_files == train.cache_files
    train3, _ = build_datasets(c.model_copy(update={"add_eos": False}), tok, seed=1, log=lambda m: None)
    assert train3.cache_files != train.cache_files


def test_num_proc_gives_the_same_rows(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", chat_rows(12))
    one, _ = build_datasets(cfg(f, tmp_path, format="chat"), tok, log=lambda m: None)
    two, _ = build_datasets(cfg(f, tmp_path / "b", format="chat", num_proc=2), tok, log=lambda m: None)
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def test_packing(tmp_path, tok):
    samples = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10] * 12]
    ids, labels = pack_samples(samples, [[1, 2, 3], [-100, 5], [6, 7, 8, 9], [10] * 12], max_length=6)
    assert ids == [[1, 2, 3, 4, 5], [6, 7, 8, 9], [10] * 6]
    assert labels[0] == [1, 2, 3, -100, 5]
    ids, labels, pos = pack_samples(samples, [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10] * 12], max_length=6, reset=True)
    assert ids == [[1, 2, 3, 4, 5], [6, 7, 8, 9], [10] * 6]
    assert labels[0] == [-100, 2, 3, -100, 5] and pos[0] == [0, 1, 2, 0, 1] and pos[2] == list(range(6))
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "ab" * (i % 5 + 1)} for i in range(30)])
    unpacked, _ = build_datasets(cfg(f, tmp_path, format="text", max_length=32), tok, log=lambda m: None)
    packed, _ = build_datasets(cfg(f, tmp_path, format="text", max_length=32, pack=True), tok, log=lambda m: None)
    assert len(packed) < len(unpacked) and max(len(r) for r in packed["input_ids"]) <= 32
    assert sum(map(len, packed["input_ids"])) == sum(map(len, unpacked["input_ids"]))
    assert pack_dataset(unpacked, 32)["input_ids"] == packed["input_ids"]
    assert "position_ids" in packed.column_names  # reset is the default
    carried, _ = build_datasets(cfg(f, tmp_path, format="text", max_length=32, pack=True, pack_state="carry"), tok,
                                log=lambda m: None)
    assert carried["input_ids"] == packed["input_ids"] and "position_ids" not in carried.column_names
    b = collate([packed[0], packed[1]])
    assert b["position_ids"].shape == b["input_ids"].shape
    n = len(packed[1]["input_ids"])
    assert (b["position_ids"][1, n:] != 0).all()  # padding starts no sample


def test_packed_rows_with_resets_lose_what_the_samples_lose_alone(tmp_path, tok):
    """Eval loss of packed rows (reset) equals that of the samples one per row; carried packing differs."""
    import torch
    from rwkv_peft.training.evaluation import evaluate_rows
    from rwkv_peft.methods import load_base_model
    from tests.training.helpers import tiny_model_file
    f = write_jsonl(tmp_path / "c.jsonl", chat_rows(9))
    kw = dict(format="chat", max_length=200)
    alone, _ = build_datasets(cfg(f, tmp_path, **kw), tok, log=lambda m: None)
    packed, _ = build_datasets(cfg(f, tmp_path, pack=True, **kw), tok, log=lambda m: None)
    carried, _ = build_datasets(cfg(f, tmp_path, pack=True, pack_state="carry", **kw), tok, log=lambda m: None)
    assert len(packed) < len(alone)
    model = load_base_model(tiny_model_file(tmp_path / "m.pth"), dtype=torch.float32)
    a = evaluate_rows(model, alone, batch_size=3)
    p = evaluate_rows(model, packed, batch_size=2)
    c = evaluate_rows(model, carried, batch_size=2)
    assert float(a[1]) == float(p[1]) and abs(float(a[0]) - float(p[0])) < 1e-6 * float(a[0])
    assert abs(float(a[0]) - float(c[0])) > 1e-3
    assert abs(float(p[0]) - float(evaluate_rows(model, packed, batch_size=2, chunk_len=37)[0])) < 1e-6 * float(a[0])


def test_collate_targets_and_chunks():
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert shifted_targets(b["labels"]).tolist() == [[6, 7, IGNORE], [IGNORE, IGNORE, IGNORE]]
    assert collate([{"input_ids": [1], "labels": [1]}], pad_to_multiple=4)["input_ids"].shape[1] == 4
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
