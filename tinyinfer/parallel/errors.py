"""Errors of parallel runs. Each says what is wrong and what to do."""


class ParallelConfigError(ValueError):
    """A tp / pp / dp that does not fit the model or the world (the message lists what works)."""


class ParallelError(RuntimeError):
    """A device of the group failed or stopped answering; the others stop with this error."""
