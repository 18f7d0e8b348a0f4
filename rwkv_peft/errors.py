"""The one root of this package's errors, and the exit code each maps to in ``rwkv-peft``.

Every error the package raises on purpose derives from :class:`RWKVPeftError`; its message names the file, the
key or the value at fault and what is expected. ``cli.main`` catches the root once and exits with the error's
``exit_code``: 2 for bad input (a recipe, a file, an argument, data, an adapter that does not fit), 1 for a run
that started and failed. The subclasses stay importable where they are defined (``recipe.RecipeError``,
``data.DataError``, ...) and keep their old bases too (most are ``ValueError``s), so code catching those still works.
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class RWKVPeftError(Exception):
    """Root of rwkv-peft's errors; ``exit_code`` is what the command line exits with."""
    exit_code: int = EXIT_BAD_INPUT


class CheckpointError(RWKVPeftError, ValueError):
    """A checkpoint that cannot be read as the model it claims to be; the message names the file and key."""
