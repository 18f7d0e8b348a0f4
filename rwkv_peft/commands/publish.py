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


def run(args) -> int:
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
        msg = publish(folder, args.repo_id, private=not args.public, base_model=args.base_model,
                      dry_run=args.dry_run)
        if staged is not None and args.dry_run:
            print((staged / "README.md").read_text(encoding="utf-8"))
            msg = f"dry run: model card for {args.folder} printed above; nothing uploaded"
        print(msg.replace(str(folder), shown(args.folder)))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # network, auth: say what failed without echoing credentials
        print(f"error: upload failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 1
    finally:
        if staged is not None:
            shutil.rmtree(staged.parent, ignore_errors=True)
    return 0
