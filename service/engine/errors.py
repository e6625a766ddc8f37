"""Exceptions the engine raises for requests it refuses; the API layer maps each to a gRPC status code."""


class InvalidRequest(ValueError):
    """The request can never succeed as sent (bad parameter, empty or over-long input)."""


class QueueFull(RuntimeError):
    """The replica is at its queue limit; the same request may succeed later."""


class NotReady(RuntimeError):
    """The engine is starting or shutting down."""
