"""``python -m bnfold.reasons``: print the README's table of reason codes."""

from bnfold.reasons import markdown_table

print(markdown_table())
