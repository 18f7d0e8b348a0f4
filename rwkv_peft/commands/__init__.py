"""Sub-commands of ``rwkv-peft`` (see ``rwkv_peft/cli.py`` for the contract each module follows)."""
