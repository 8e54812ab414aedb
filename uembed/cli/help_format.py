"""How ``--help`` shows an option's default: as a user would type it (``--hidden 192``, ``--budgets
0.01,0.03``), and not at all where it says nothing (a flag, an option left unset, an empty list)."""

from __future__ import annotations

import argparse
from pathlib import Path


def shown_default(value: object, separator: str = ",") -> str | None:
    """The default as it would be typed on the command line (a list joined by ``separator``: a comma for one
    comma-separated argument, a space for ``nargs="+"``), or None where showing it would mislead."""
    if value is None or value is argparse.SUPPRESS or isinstance(value, bool):
        return None
    if isinstance(value, (tuple, list)):
        return separator.join(shown_default(item) or "" for item in value) or None
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        return str(value)
    return str(value)


class DefaultsFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter without its slips: no ``(default: (192,))``, no ``(default: True)``
    on a ``--no-...`` flag, no ``(default: None)``; a help text that states its own default keeps it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.nargs == 0:
            return text
        shown = shown_default(action.default, " " if action.nargs in ("+", "*") or isinstance(action.nargs, int) else ",")
        return text if shown is None else f"{text} (default: {shown.replace('%', '%%')})"


class RawDescriptionDefaultsFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """The defaults as above, the description and epilog as written (a table of settings)."""
