"""The exceptions users see: a message that says what is wrong and how to fix it."""


class CnnlabError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite."""

    exit_code = 3


class Interrupted(CnnlabError):
    """Stopped by SIGINT (exit 130) or SIGTERM (exit 143) after writing a checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
