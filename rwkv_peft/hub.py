"""Publishing to the Hugging Face Hub: a model card written from what a folder holds, then one upload.

The token comes from ``huggingface_hub`` (``HF_TOKEN`` or ``huggingface-cli login``); it is never printed,
logged or written anywhere by this module. The Hub is ``huggingface_hub``'s endpoint (``HF_ENDPOINT``, read when
``huggingface_hub`` is imported) unless :func:`publish` is given one (a mirror, or a local stand-in in tests).

Nothing local goes into the card: the training recipe it quotes has its absolute paths rewritten the way adapter
manifests record paths (``rwkv_peft.paths.portable_path``: relative to the current directory, ``~/...``), and a
path outside both is shown by its last part only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from . import versions

ADAPTER_MANIFEST = "rwkv_peft_adapter.json"


def describe_folder(folder: Path) -> dict:
    """What a folder is: an adapter (LoRA / state), a merged model, or a converted model."""
    folder = Path(folder)
    manifest_path = folder / ADAPTER_MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        return {"kind": "adapter", "manifest": manifest}
    config_path = folder / "config.json"
    if config_path.is_file():
        return {"kind": "model", "config": json.loads(config_path.read_text())}
    raise FileNotFoundError(f"{folder}: neither an adapter folder ({ADAPTER_MANIFEST}) nor a model folder "
                            f"(config.json)")


def _looks_like_hub_id(spec) -> bool:
    """``org/name`` that is not a local path spec (``assets:...``, ``~/...``, ``models/x.pth``, an existing path)."""
    import re
    if not spec or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(spec)):
        return False
    return Path(str(spec)).suffix not in (".pth", ".safetensors", ".bin", ".pt") and not Path(str(spec)).exists()


def _recipe_text(folder: Path) -> Optional[str]:
    for candidate in (folder / "recipe.yaml", folder.parent / "recipe.yaml"):
        if candidate.is_file():
            return portable_text(candidate.read_text(encoding="utf-8"))
    return None


_ABS_PATH = re.compile(r"(?<![\w.~:/-])(/(?:[^\s'\",:#\]\}]+))")


def portable_text(text: str) -> str:
    """``text`` (a recipe) with every absolute path in it made portable (``portable_path``: relative to the
    current directory, ``~/...``, ``assets:...``); one outside those is cut to ``.../<last part>``."""
    from .paths import portable_path

    def fix(m: "re.Match[str]") -> str:
        shown = portable_path(m.group(1))
        return f".../{Path(shown).name}" if shown.startswith("/") else shown
    return _ABS_PATH.sub(fix, text)


def build_model_card(folder: Path, repo_id: str, base_model: Optional[str] = None) -> ModelCard:
    folder = Path(folder)
    info = describe_folder(folder)
    tags = ["rwkv", "rwkv7", "rwkv-peft"]
    if info["kind"] == "adapter":
        m = info["manifest"]
        contains = m.get("contains", {})
        methods = [name for name, on in (("LoRA", contains.get("lora")), ("MiSS", contains.get("miss")),
                                          ("state tuning", contains.get("state"))) if on]
        tags += (["lora"] * bool(contains.get("lora")) + ["miss"] * bool(contains.get("miss"))
                 + ["state-tuning"] * bool(contains.get("state")))
        base = m.get("base", {})
        base_model = base_model or (base.get("path") if _looks_like_hub_id(base.get("path")) else None)
        sizes = ", ".join(f"{k} {base[k]}" for k in ("num_hidden_layers", "hidden_size", "num_heads", "head_size",
                                                      "vocab_size") if k in base)
        version = versions.by_name(base.get("architecture")) or versions.DEFAULT
        what = f"An rwkv-peft adapter ({' + '.join(methods) or 'empty'}) for an {version.title} base model ({sizes})."
        usage = (
            "```python\nimport rwkv_peft\nfrom rwkv_peft.methods import load_base_model, load_adapter\n\n"
            f"base = load_base_model(\"<the base model: .pth, folder or Hub id>\")\nmodel = load_adapter(base, \"{repo_id}\")\n```\n\n"
            "Or merge it into the base for any RWKV runtime: `rwkv-peft merge --base BASE --adapter "
            f"{repo_id} --out merged.pth`."
        )
        library = "peft" if contains.get("lora") or contains.get("miss") else "transformers"
    else:
        cfg = info["config"]
        version = versions.by_model_type(cfg.get("model_type")) or versions.DEFAULT
        what = (f"An {version.title} model ({cfg.get('num_hidden_layers')} layers, width {cfg.get('hidden_size')}, "
                f"vocab {cfg.get('vocab_size')}) in rwkv-peft's Hugging Face format.")
        usage = ("```python\nimport rwkv_peft\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")\n"
                 f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")\n```")
        library = "transformers"
    data = ModelCardData(library_name=library, tags=tags, base_model=base_model, pipeline_tag="text-generation")
    recipe = _recipe_text(folder)
    body = [f"# {repo_id.split('/')[-1]}", "", what, "", "## Use", "", usage, ""]
    if recipe:
        body += ["## Training recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    body += ["Made with [rwkv-peft](https://pypi.org/project/rwkv-peft/)."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def publish(folder: Path, repo_id: str, private: bool = True, base_model: Optional[str] = None,
            dry_run: bool = False, commit_message: str = "Upload with rwkv-peft",
            endpoint: Optional[str] = None) -> str:
    """Write README.md (model card) into ``folder`` and upload the folder (``create_repo``, then
    ``upload_folder``; checkpoints, temporary and hidden files stay behind); ``dry_run`` stops before the upload.
    ``endpoint``: the Hub's base URL (default: ``huggingface_hub``'s, i.e. ``HF_ENDPOINT`` or huggingface.co).
    Returns a one-line description naming the commit URL."""
    from .convert import atomic_path
    folder = Path(folder)
    card = build_model_card(folder, repo_id, base_model)
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    if dry_run:
        return f"dry run: model card written to {folder / 'README.md'}; nothing uploaded"
    from huggingface_hub import HfApi
    api = HfApi(endpoint=endpoint.rstrip("/")) if endpoint else HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             ignore_patterns=["checkpoint*/**", "*.tmp*", ".*"])
    return f"uploaded {folder} to {getattr(info, 'commit_url', repo_id)}"
