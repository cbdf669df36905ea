"""Exception types shared by the pure core and the I/O shell.

``ConfigError`` carries the file, the key path inside it and the reason, so the CLI can print a
precise message and map it to an exit code. ``ProtocolError`` marks client or upstream input the
proxy refuses to interpret; the session turns it into a reply and a close, it never escapes the
relay.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration, ACL or certificate problem, located by file and key path (and by line
    and column when the error is in the YAML syntax itself, where no key path exists)."""

    def __init__(
        self, source: str, key: str, reason: str, line: int | None = None, column: int | None = None
    ) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        self.line = line
        self.column = column
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class ProtocolError(Exception):
    """Input that cannot be framed or parsed safely; the connection must be closed."""
