"""What the three command lines share: a usage error is one line on stderr and exit 2.

argparse's own ``error`` prints the whole usage block first (dozens of lines for main_pipeline.py)
and then the message; the project's contract for bad input is a single ``error: ...`` line, the
same for a mistyped flag as for a bad record.
"""
from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line naming the flag; subcommand parsers
    made with ``add_subparsers`` are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
