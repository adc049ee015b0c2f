"""``python -m portferry ARGS`` runs the ``portferry`` command (``relay``, ``forward``,
``demo``) with ``ARGS``: the program named by ``PORTFERRY_BIN``, else ``portferry`` on
the ``PATH`` (``cargo install --path .`` in the repository installs it). The package
itself holds only the agent library, not the command line or the relay."""

from __future__ import annotations

import os
import shutil
import sys


def main() -> None:
    command = os.environ.get("PORTFERRY_BIN") or shutil.which("portferry")
    if command is None:
        sys.exit(
            "python -m portferry runs the `portferry` command, which is not installed: "
            "run `cargo install --path .` in the portferry repository, "
            "or set PORTFERRY_BIN to its path"
        )
    os.execv(command, [command, *sys.argv[1:]])


if __name__ == "__main__":
    main()
