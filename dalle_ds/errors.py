"""The errors user-facing checks raise; the CLI (dalle_ds/cli/common.py) prints each as one line without a
traceback: ConfigError exits 2 (bad argument, config or input file), RunFailed exits 1."""


class ConfigError(ValueError):
    """A configuration value or argument is unknown, of the wrong type or inconsistent with another one."""


class RunFailed(RuntimeError):
    """A run that cannot go on for a reason the user must act on (e.g. a non-finite validation loss); the CLI
    prints it as one line and exits 1."""
