"""The export's error type, in its own module so that every export module can raise it."""

from secateur.errors import SecateurError


class ExportError(SecateurError):
    """The model cannot be written as GGUF as asked."""
