"""Errors for bad user input: the CLI reports them in one line and exits with status 2."""


class MedMambaError(Exception):
    """Input the user can fix: a config, a dataset, a tracking store."""


class ConfigError(MedMambaError, ValueError):
    """A config file or override that does not fit the schema."""


class DataError(MedMambaError, ValueError):
    """A dataset that cannot be used as configured (missing, corrupt, unknown, wrong shape)."""


class TrackingError(MedMambaError, RuntimeError):
    """The MLflow tracking store cannot be used."""


class CheckpointError(MedMambaError, ValueError):
    """A checkpoint file that cannot be read, written or does not fit the model."""


class FederationError(MedMambaError, RuntimeError):
    """A federated run that cannot go on, e.g. fewer sites trained in a round than it needs."""


class TrainingError(MedMambaError, FloatingPointError):
    """Training that cannot go on as configured (e.g. the loss stopped being finite)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a scheduler, `ray job stop`, `docker stop` or `timeout` sends it: a command
    ends as after Ctrl-C (its MLflow run KILLED, its checkpoints kept for --resume)."""
