"""Thin shim so `python cli.py ...` works from a checkout; the real CLI is `bnfold.cli`."""

from bnfold.cli import run

if __name__ == "__main__":
    run()
