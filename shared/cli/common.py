"""What every command shares: the installation's settings and how a refusal is printed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamaduo.settings import Settings

#: Exit status of a command refused for its input (a bad argument, spec or dataset), as argparse's own.
USAGE_EXIT = 2


def load_settings() -> Settings:
    """The installation's settings from ``LLAMADUO_*`` variables (imported late: ``--help`` stays fast)."""
    from llamaduo.settings import Settings

    return Settings()


def fail(message: str, code: int = USAGE_EXIT) -> int:
    """Print ``llamaduo: message`` on stderr and return ``code``, the command's exit status."""
    print(f"llamaduo: {message}", file=sys.stderr)
    return code
