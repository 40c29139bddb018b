"""The ``bnfold`` command line: ``fold``, ``inspect``, ``verify``.

Exit codes: 0 success (and equivalent), 1 verification failed (or, with ``inspect --check``, a batch norm
would fold), 2 usage error or bad input, 3 internal error, 128 + signal number when SIGINT (130) or SIGTERM
(143) stops it. Over many models, the largest of the models' codes. Errors are one line on stderr; set
``BNFOLD_DEBUG=1`` for a traceback.
"""

from bnfold.cli.commands import main
from bnfold.cli.process import end_process, run, run_command

__all__ = ["end_process", "main", "run", "run_command"]
