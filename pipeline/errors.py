"""The base class of errors a user can fix (bad params, missing inputs, ...): the CLI prints them in one line."""


class UserError(Exception):
    """An error caused by the user's input or set-up, not by a bug; ``wsss`` exits with code 2 on it."""
