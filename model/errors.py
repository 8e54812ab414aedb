"""One error taxonomy: every failure a user can cause is a UembedError with a kind.

The CLI prints ``error: <message>`` for these (no traceback); the service maps
``status`` to an HTTP status code in one place.
"""

from __future__ import annotations


class UembedError(Exception):
    """Base of the errors a user can fix; the message names the field, file or value."""

    kind = "error"
    status = 400


class SpecError(UembedError):
    """A feature spec or a model configuration is inconsistent."""

    kind = "spec"


class DataError(UembedError):
    """Input data is missing, empty, or does not match the spec."""

    kind = "data"


class BudgetError(UembedError):
    """An embedding budget cannot be met (too small for the features, or not positive)."""

    kind = "budget"
