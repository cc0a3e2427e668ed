"""Errors a training run reports to its user (the CLI prints them as one line)."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite; what was saved before is kept."""
