"""``python -m procsync``: the ``procsync`` command (see :mod:`procsync.cli`)."""

from __future__ import annotations

# The guard matters: the demos start buyers with multiprocessing's "spawn", which
# imports this module again in every child as ``__mp_main__``.
if __name__ == "__main__":
    from procsync.cli import main

    main(prog_name="procsync")
