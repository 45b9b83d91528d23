"""The ``featurepipe`` command line: a thin layer over library calls.

One module per group of commands (``pipeline``, ``training``, ``quality``, ``stream``,
``local``), the options they share in ``options``, and the group that gathers them in
``group``. ``featurepipe = "featurepipe.cli:main"`` is the console script.
"""

from featurepipe.cli.group import main

__all__ = ["main"]
