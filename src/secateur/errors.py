"""One base class for every error a user can fix: the CLI prints its message on one line and exits 2."""


class SecateurError(ValueError):
    """Bad input (a path, a setting, a text source, a model that does not fit the request); the
    message says what was wrong and what to do instead."""


class OutputError(SecateurError):
    """The output location cannot be used: it exists, it is not writable, or it would hold or
    overwrite one of the run's inputs."""


class ConfigError(SecateurError):
    """A configuration value is out of range or inconsistent; the message says how to fix it."""


class TrainError(SecateurError):
    """Training cannot start as asked (too few windows, a checkpoint in the way, ...)."""


class DataError(SecateurError):
    """A text source is missing, unreadable or too short; the message says what was expected."""
