"""The ``weightslab`` command (:mod:`.commands`) and the catalog it lists from (:mod:`.catalog`).

The listing path (``weightslab ls``, ``log``, ``reindex``) imports no torch: importing torch alone
takes longer than listing 10,000 checkpoints from the catalog. Commands that read tensors (``diff``,
``export``) import it when they run.
"""

from .commands import EXIT_CODES, main

__all__ = ["main", "EXIT_CODES"]
