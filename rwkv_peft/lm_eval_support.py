"""Benchmarks through EleutherAI's lm-evaluation-harness (``lm-eval``), on models already loaded here.

``rwkv-peft eval RECIPE --tasks ...`` uses this module: each model (the recipe's base, then the run's adapter on
it, or a merged model) is wrapped in lm-eval's Hugging Face backend, ``lm_eval.models.huggingface.HFLM``, which
takes a ``transformers`` model and tokenizer as they are (``pretrained=<model>``, ``tokenizer=<tokenizer>``,
``backend="causal"``), and the tasks run through ``lm_eval.simple_evaluate``. Our RWKV models answer HFLM's calls
(``model(input_ids).logits``, ``generate``) like any causal LM; HFLM pads loglikelihood batches on the right,
which an RNN reads correctly (a position never sees what comes after it).

Tasks are lm-eval's (``hellaswag``, ``lambada_openai``, ...; their datasets come from the Hugging Face Hub, so
they need a network or a filled ``datasets`` cache) or your own YAML tasks in a folder (``include_path``), e.g. a
local jsonl::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    metric_list: [{metric: acc}]

``lm-eval`` is an optional dependency (``pip install 'rwkv-peft[eval]'``); :func:`require_lm_eval` says so when
it is missing.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .errors import EXIT_FAILED, RWKVPeftError

Scores = Dict[str, Dict[str, Tuple[float, Optional[float]]]]  # task -> metric -> (value, stderr or None)


class EvalError(RWKVPeftError, ValueError):
    """A benchmark run that cannot start as asked (missing lm-eval, unknown task, bad task folder)."""


class EvalRunError(RWKVPeftError, RuntimeError):
    """A benchmark run that started and failed (a dataset that cannot be loaded, a task that errors)."""
    exit_code = EXIT_FAILED


def require_lm_eval():
    """The ``lm_eval`` package, or :class:`EvalError` saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the backend we use must import too)
    except ImportError as e:
        raise EvalError(f"--tasks needs lm-evaluation-harness, which is not installed ({e}); install it with "
                        f"pip install 'rwkv-peft[eval]' (or pip install lm-eval)") from None
    return lm_eval


def _local_task_names(folder: Path) -> Dict[str, Path]:
    """``task:`` names the YAML files under ``folder`` define (a quick scan, no lm-eval index)."""
    import yaml

    class _Loader(yaml.SafeLoader):  # lm-eval YAML uses !function tags; they do not matter for the names
        pass
    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise EvalError(f"--include-path {path}: not a readable YAML task ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
        if isinstance(data, dict):
            task = data.get("task")
            for name in task if isinstance(task, list) else [task]:
                if isinstance(name, str):
                    names[name] = path
    return names


def task_manager(tasks: Sequence[str], include_path: Optional[Union[str, os.PathLike]] = None):
    """(an lm-eval ``TaskManager``, the task names to run).

    ``include_path``: a folder of YAML tasks or one YAML file (its folder is indexed; with no ``tasks`` its own
    tasks run). When every task asked for is defined there, lm-eval's ~15k built-in tasks are not indexed (that
    index takes seconds); otherwise they are, and names are looked up in both. An unknown name is an
    :class:`EvalError` listing close matches."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t and t.strip()]
    folder = None
    if include_path is not None:
        p = Path(include_path).expanduser()
        if not p.exists():
            raise EvalError(f"--include-path {os.fspath(include_path)!r}: no such folder or file")
        if p.is_file():
            if p.suffix not in (".yaml", ".yml"):
                raise EvalError(f"--include-path {p}: expected a folder of YAML tasks or a .yaml file")
            folder = p.parent
            if not tasks:
                tasks = [n for n, f in _local_task_names(folder).items() if f == p]
                if not tasks:
                    raise EvalError(f"--include-path {p}: defines no 'task:'")
        else:
            folder = p
    if not tasks:
        raise EvalError("--tasks: name at least one lm-eval task (e.g. --tasks hellaswag,lambada_openai), or "
                        "pass --include-path TASK.yaml")
    local = _local_task_names(folder) if folder is not None else {}
    only_local = folder is not None and all(t in local for t in tasks)
    manager = TaskManager(include_path=str(folder) if folder is not None else None,
                          include_defaults=not only_local)
    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known and not Path(t).is_file():
            close = difflib.get_close_matches(t, sorted(known), n=4)
            where = "lm-eval's tasks" + (f" or {folder}" if folder is not None else "")
            raise EvalError(f"--tasks: unknown task {t!r} (not among {where})"
                            + (f"; close: {', '.join(close)}" if close else ""))
    return manager, tasks


def wrap(model, tokenizer, batch_size: int = 8, max_length: int = 4096):
    """lm-eval's ``HFLM`` around an already-loaded model (ours, or a peft model around ours) and tokenizer."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise EvalError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; lm-eval would add "
                        f"one the model does not have")
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                max_length=max_length)


def run_tasks(lm, tasks: Sequence[str], manager, limit: Optional[float] = None, num_fewshot: Optional[int] = None,
              bootstrap_iters: int = 0, seed: int = 1234, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on ``lm``; returns its result dict (``results``, ``configs``, ``samples``...).
    A failure inside (a dataset that cannot be loaded offline, a task error) is an :class:`EvalRunError` naming
    the tasks and the first line of the cause."""
    require_lm_eval()
    import contextlib
    from unittest import mock

    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    # simple_evaluate records the environment in its result (torch's collect_env: `pip list` and more in
    # subprocesses, ~1.5 s a call) and the git hash of the working directory (git's "not a git repository" on
    # stderr); neither is used here
    quiet = contextlib.ExitStack()
    for name, value in (("add_env_info", lambda results: None), ("get_git_commit_hash", lambda: None)):
        if hasattr(lm_eval.evaluator, name):
            quiet.enter_context(mock.patch.object(lm_eval.evaluator, name, value))
    try:
        with quiet:
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                  log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    except RWKVPeftError:
        raise
    except Exception as e:  # noqa: BLE001  (datasets, jinja, lm-eval internals: one clear line)
        first = str(e).splitlines()[0] if str(e) else ""
        hint = ""
        if "offline" in str(e).lower() or "connect" in str(e).lower() or "couldn't reach" in str(e).lower():
            hint = " (the task's dataset is not in the local cache and the network is off)"
        raise EvalRunError(f"lm-eval tasks {', '.join(tasks)} failed: {type(e).__name__}: {first}{hint}") from e
    if out is None:  # simple_evaluate returns None on ranks other than 0
        raise EvalRunError("lm-eval returned no results")
    return out


def scores(results: dict) -> Scores:
    """``{task: {metric: (value, stderr)}}`` from ``simple_evaluate``'s ``results`` (filters other than ``none``
    keep their name: ``exact_match,strict-match`` -> ``exact_match (strict-match)``)."""
    out: Scores = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            err = metrics.get(f"{metric}_stderr,{flt}")
            name = metric if flt == "none" else f"{metric} ({flt})"
            row[name] = (float(value), float(err) if isinstance(err, (int, float)) else None)
        out[task] = row
    return out


def table(rows: Sequence[Tuple[str, Scores]]) -> str:
    """A Markdown table: one row per model, one column per task and metric (value, ``± stderr`` when known)."""
    columns: List[Tuple[str, str]] = []
    for _, sc in rows:
        for task, metrics in sc.items():
            for metric in metrics:
                if (task, metric) not in columns:
                    columns.append((task, metric))
    head = ["model"] + [f"{t} {m}" for t, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, sc in rows:
        cells = [name]
        for task, metric in columns:
            value = sc.get(task, {}).get(metric)
            if value is None:
                cells.append("-")
            else:
                v, err = value
                cells.append(f"{v:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quiet_lm_eval(verbose: bool = False) -> None:
    """lm-eval logs each step at INFO/WARNING (and warns that the model was passed in as an object, which is
    what we mean); keep errors only unless ``verbose``."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(level)
