"""rwkv-peft publish FOLDER REPO_ID"""
import sys

HELP = "write a model card for an adapter or model folder and upload it to the Hugging Face Hub"


def add_arguments(p):
    p.add_argument("folder", help="an adapter folder (from training) or a model folder (from convert/merge)")
    p.add_argument("repo_id", help="user-or-org/name on the Hub")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--base-model", help="the base model's Hub id, for the card's metadata")
    p.add_argument("--dry-run", action="store_true", help="write the model card only; upload nothing")


def run(args) -> int:
    from ..hub import publish
    try:
        print(publish(args.folder, args.repo_id, private=not args.public, base_model=args.base_model,
                      dry_run=args.dry_run))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # network, auth: say what failed without echoing credentials
        print(f"error: upload failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 1
    return 0
