"""The stack `flock eval` measures when no --gateway is given (shared with `flock bench`)."""

from service.stack import LocalStack as EvalStack
from service.stack import say

__all__ = ["EvalStack", "say"]
