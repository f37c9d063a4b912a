"""User-facing errors: one line that names the problem and the fix; CLIs print them and exit with status 2."""


class FsynthError(Exception):
    """Bad input or environment the user can fix; the message is one line and says how."""


class ConfigError(FsynthError):
    """A configuration key, value or preset is wrong."""


class DataError(FsynthError):
    """A dataset root, split file, image or sampling request is wrong."""


class UsageError(FsynthError):
    """A command line its parser refuses: an unknown flag, a missing or malformed argument."""
