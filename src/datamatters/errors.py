"""Errors a user can cause. Entry points turn them into one clear message and a non-zero exit."""


class UserError(Exception):
    """Bad input (missing data, wrong artifact, impossible setting): the message says what to do."""
