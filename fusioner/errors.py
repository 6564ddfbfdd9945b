"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, an unknown backbone) raises a
:class:`FusionerError` whose message names the file, key or value and says what was expected.
The CLI prints these as one line; every other exception is a bug and keeps its traceback.
"""


class FusionerError(Exception):
    """An error in the user's input, reported without a traceback by the CLI."""


class ConfigError(FusionerError, ValueError):
    """A config key or value that is unknown or out of range."""


class DataError(FusionerError, ValueError):
    """A dataset file that is missing, unreadable or inconsistent."""


class WeightsError(FusionerError, FileNotFoundError):
    """Weights that cannot be found or do not fit the architecture."""


class UnknownNameError(FusionerError, KeyError):
    """A registry lookup for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
