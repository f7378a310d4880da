"""Errors of the expert pool. The gateway maps them to OpenAI-shaped 4xx responses."""


class PoolError(Exception):
    """Base class; `status` is the HTTP status the gateway answers with."""

    status = 400
    code = "invalid_expert"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidExpert(PoolError):
    status = 422
    code = "invalid_expert"


class ForbiddenPath(PoolError):
    status = 403
    code = "path_not_allowed"


class ExpertExists(PoolError):
    status = 409
    code = "expert_exists"


class StateNotWritable(PoolError):
    """The pool's state file could not be written (disk full, read-only): the change is refused, nothing lost."""

    status = 503
    code = "state_not_writable"


class UnknownExpert(PoolError):
    status = 404
    code = "model_not_found"


class NotPermitted(PoolError):
    """The caller may see the expert but not change it (a tenant key and a shared expert)."""

    status = 403
    code = "insufficient_permissions"


class NameNotAllowed(PoolError):
    """A tenant's expert whose name is outside the tenant's namespace (adapters/tenants.py)."""

    status = 403
    code = "name_not_allowed"
