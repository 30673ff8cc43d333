"""One-line errors for the click commands: our errors subclass ValueError (or are OSErrors) and name
the file, tensor or setting, so the user sees that line and exit code 1, never a traceback."""

from __future__ import annotations

import functools

import click


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper
