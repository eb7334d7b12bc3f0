"""The CLI's consoles, made on first use.

``kiln operator`` runs for weeks inside the same process as the CLI that parsed its flags, and never prints
through a console: its output is logging. Importing rich cost that process 1.4 MB of resident memory for good
(docs/benchmarks.md, "Fewer handler threads, no rich in the operator"), so the module-level consoles of
``kiln.cli`` and ``kiln.kubectl_plugin`` import it only when a command first prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class LazyConsole:
    """A ``rich.console.Console`` with these options, made when first printed through or handed on."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)
