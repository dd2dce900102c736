"""The one base class for problems a user can fix; the CLI prints their message without a traceback."""


class PipelineError(RuntimeError):
    """A problem with input, data, weights or settings; the message names it and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, as a decision: the message says what stopped, what was kept and how to go on.
    A KeyboardInterrupt still, so that nothing that catches errors (Optuna's trial loop) goes on."""
