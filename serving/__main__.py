"""``python -m serving [options]``: the feature server's command, :func:`serving.command.serve`.

The same click command as ``featurepipe serve``, kept under this name for existing users
and for the worker processes ``--workers N`` starts.
"""

import os

from serving.command import serve

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    serve.main(prog_name="python -m serving")
