"""One error type for everything a user can get wrong.

A :class:`KataError` carries a single line that names the file (or host, or option) and the problem and,
where there is one, what to do. The CLI prints it as ``pytest-kata: error: ...`` and exits 2; the plugin turns
it into a ``pytest.UsageError`` so that pytest prints one line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class KataError(Exception):
    """A user-facing failure with a one-line message."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(" ".join(text.split()))  # always one line


class BundleError(KataError):
    """A candidate bundle cannot be opened or is unsafe."""


class FeedError(KataError):
    """An advisory or vulnerability feed is missing or malformed."""


class ConfigError(KataError):
    """A Kata configuration, rule file, waiver file or kata.toml is malformed."""


def check_output_file(path: str | Path, what: str) -> Path:
    """Fail now, in one line, when an output file the user named (``what``: the option) cannot be written,
    instead of with a traceback after all the work is done. Creates missing parent directories."""
    out = Path(path)
    if out.is_dir():
        raise KataError(f"{what} names a directory, not a file", path=out)
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise KataError(f"{what}: cannot write here: {exc.strerror}", path=out) from None
    if not existed:
        out.unlink()
    return out
