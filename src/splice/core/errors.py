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
