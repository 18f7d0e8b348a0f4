"""rwkv-peft publish FOLDER REPO_ID"""
import sys

HELP = "write a model card for an adapter or model folder and upload it to the Hugging Face Hub"


def add_arguments(p):
    p.add_argument("folder", help="an adapter folder (from training) or a model folder (from convert/merge), or "
                                  "assets:NAME")
    p.add_argument("repo_id", help="user-or-org/name on the Hub")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--base-model", help="the base model's Hub id, for the card's metadata")
    p.add_argument("--dry-run", action="store_true", help="write the model card only; upload nothing")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="the Hub's base URL (a mirror or a private Hub; default: $HF_ENDPOINT, else huggingface.co). "
                        "The token comes from $HF_TOKEN or `hf auth login` and is never printed")


def run(args) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from ..hub import publish
    from ..recipe import ASSETS_DIR
    from ._common import resolve_input, shown

    folder = resolve_input(args.folder, "FOLDER", kind="folder")
    staged = None
    try:
        if folder.resolve().is_relative_to(ASSETS_DIR.resolve()):
            # the package's own files are never written to: the card goes into a copy
            staged = Path(tempfile.mkdtemp(prefix="rwkv-peft-publish-")) / folder.name
            shutil.copytree(folder, staged)
            folder = staged
        endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or None  # read now, not at import
        msg = publish(folder, args.repo_id, private=not args.public, base_model=args.base_model,
                      dry_run=args.dry_run, endpoint=endpoint)
        if staged is not None and args.dry_run:
            print((staged / "README.md").read_text(encoding="utf-8"))
            msg = f"dry run: model card for {args.folder} printed above; nothing uploaded"
        print(msg.replace(str(folder), shown(args.folder)))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # network, auth: say what failed without echoing credentials
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: upload failed ({type(e).__name__}: {_scrub(first)})", file=sys.stderr)
        return 1
    finally:
        if staged is not None:
            shutil.rmtree(staged.parent, ignore_errors=True)
    return 0


def _scrub(text: str) -> str:
    """``text`` with the Hub token (if any is configured) replaced by ``***``: a server or library that echoes a
    request back must not put the token on the terminal."""
    try:
        from huggingface_hub import get_token
        token = get_token()
    except Exception:
        token = None
    return text.replace(token, "***") if token else text
