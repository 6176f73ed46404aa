class MekiError(Exception):
    """A user-facing problem (bad input, unsupported file, ...).

    The CLI prints `error: <message>` on one line and exits non-zero; the message must name
    the problem on its own (no traceback is shown).
    """
