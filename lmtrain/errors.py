"""`LmtrainError`: a failure the user can act on. The CLI prints it as one line `lmtrain: error: ...`
and exits with its `exit_code` (2, or 3 for a diverged run); `--debug` or LMTRAIN_DEBUG=1 shows the
traceback instead."""


class LmtrainError(Exception):
    """An error whose message names the problem and the fix."""

    exit_code = 2
