"""What the controller's parts raise for a request that cannot be done; the servicers map them to codes."""


class NotFound(Exception):
    """No such node, experiment or stage (NOT_FOUND; an unknown node session is FAILED_PRECONDITION)."""


class Refused(Exception):
    """A request that cannot be done in the current state (the message says why)."""
