"""ModelLoadError, the error raised with one readable message when a model or tokenizer cannot be loaded."""


class ModelLoadError(RuntimeError):
    """Raised with one readable message when a model cannot be loaded."""


ModelLoadError.__module__ = "helpers.models"  # tracebacks name it as users import it: helpers.models.ModelLoadError
