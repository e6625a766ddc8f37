"""Exceptions the engine raises for requests it refuses; the API layer maps each to a gRPC status code."""


class InvalidRequest(ValueError):
    """The request can never succeed as sent (bad parameter, empty or over-long input)."""


class QueueFull(RuntimeError):
    """The replica is at its queue limit; the same request may succeed later. `reason` names which limit, for the
    refusal metrics: "queue_full" (too many waiting), "expected_wait" (its wait for a slot would pass its
    deadline), "waited_too_long" (it waited for a slot until its deadline)."""

    def __init__(self, message: str, reason: str = "queue_full"):
        super().__init__(message)
        self.reason = reason


class NotReady(RuntimeError):
    """The engine is starting or shutting down."""
