"""The one base class for problems a user can fix; the CLI prints their message without a traceback."""


class PipelineError(RuntimeError):
    """A problem with input, data, weights or settings; the message names it and the fix."""
