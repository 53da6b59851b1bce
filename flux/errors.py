"""The one exception type for problems the user must fix.

Its message is written for the person who sent the request: it says what was
wrong and what to change. Anything else raised inside the engine is a bug and
is logged with its traceback.
"""


class UserError(ValueError):
    """Bad input or an impossible request; the message tells the user what to change."""
