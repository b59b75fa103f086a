"""Capability handlers. Each kind lives in its own module and is imported only when an agent enables it."""

from edgecoop.agents.handlers.base import CallContext, Handler, handler_class, register_handler

__all__ = ["CallContext", "Handler", "handler_class", "register_handler"]
