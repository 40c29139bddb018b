"""``python -m bnfold``: the ``bnfold`` command."""

from bnfold.cli import run

run()
