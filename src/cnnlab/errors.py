"""The one exception type users see: a message that says what is wrong and how to fix it."""


class CnnlabError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits with status 2."""
