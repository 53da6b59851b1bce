"""The one exception type for problems the user must fix.

Its message is written for the person who sent the request: it says what was
wrong and what to change. Anything else raised inside the engine is a bug and
is logged with its traceback.
"""


class UserError(ValueError):
    """Bad input or an impossible request; the message tells the user what to change."""


class SettingsError(UserError):
    """A setting (environment variable) has a value this container does not know, or one that cannot run on this
    machine; the message names the setting and what to set instead."""


class WeightsError(UserError):
    """The weights could not be found, fetched or read; the message says which setting to fix."""
