"""Errors a user can act on: each names what was wrong and what exists instead."""


class SpliceError(ValueError):
    """Base class of every error splice raises on bad input."""


class TargetError(SpliceError):
    """A target pattern selected nothing, or selected a module no adapter can host."""


class ShapeMismatchError(SpliceError):
    """A tensor does not fit the module it is meant for."""


class AdapterFileError(SpliceError):
    """An adapter directory is missing, corrupt, foreign, or describes an unknown method."""


class MergeError(SpliceError):
    """An adapter cannot be merged into (or removed from) a base weight exactly."""


class OutputExistsError(SpliceError):
    """Refusing to overwrite a user's files without being asked to."""


class ConfigError(SpliceError):
    """A configuration value (a YAML training config, a `--set` value, an adapter mapping) has
    the wrong type, an impossible value, or an unknown key."""


class DataError(SpliceError):
    """Training or evaluation data that cannot be used as it is: the message names the file and
    line (or row) and what was expected there."""


class IncompatibleAdaptersError(ShapeMismatchError):
    """Adapters combined (merged, compared) that were made for different models: disjoint module
    sets with nothing in common, one module with different shapes, different base models."""
