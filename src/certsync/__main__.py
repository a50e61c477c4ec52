"""``python -m certsync``: the same command line as the ``certsync`` console script."""

from certsync.cli import main

if __name__ == "__main__":
    main()
