"""``python -m bnfold``: the ``bnfold`` command."""

from bnfold.cli import main

main(prog_name="bnfold")
