"""The project's own error types: a user's mistake, reported as one line by the CLI."""
from preprocess.layouts import LayoutError
from preprocess.runtime import DeviceError, OptionError


class ConfigError(Exception):
    """An option or config-file value that cannot work; the message says which and why."""


class CheckpointError(Exception):
    """A file that is not a maskcls checkpoint, is corrupt, or would need to run code to load."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message names where and what was kept."""


USER_ERRORS = (LayoutError, DeviceError, OptionError, ConfigError, CheckpointError, TrainingError, FileNotFoundError, NotADirectoryError)
