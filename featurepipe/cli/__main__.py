"""``python -m featurepipe.cli``: the ``featurepipe`` command without its console script."""

from featurepipe.cli import main

if __name__ == "__main__":
    main()
