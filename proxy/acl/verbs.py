"""The ACL's vocabulary: verb classes, every beanstalkd 1.12 command's verb, tube characters.

``COMMAND_VERBS`` maps all 25 commands to the verb class a rule names (``produce``, ``consume``,
``inspect``, ``manage``, ``server``) or to the pseudo-verbs ``always`` (connection-local state)
and ``any`` (``use``: any tube right). The parser, the compiled policy and lint all read these
tables; nothing here changes at run time. Pure: no I/O imports.
"""

from __future__ import annotations

from typing import Final

VERBS: Final = ("produce", "consume", "inspect", "manage", "server")
"""The verb classes a rule can name (plus ``all``, which means every one of them)."""

TUBE_VERBS: Final = ("produce", "consume", "inspect", "manage")
"""The verb classes that are about a tube (``server`` is server-wide)."""

ALWAYS: Final = "always"
"""Pseudo-verb of commands that only read or narrow the connection's own state."""

ANY: Final = "any"
"""Pseudo-verb of ``use``: allowed on a tube where the principal holds any tube right."""

COMMAND_VERBS: Final[dict[str, str]] = {
    # always: connection-local state only
    "quit": ALWAYS,
    "list-tube-used": ALWAYS,
    "list-tubes-watched": ALWAYS,
    "ignore": ALWAYS,
    # any right on the named tube
    "use": ANY,
    # produce: the used tube
    "put": "produce",
    # consume: the named tube, every watched tube, or the job's tube
    "watch": "consume",
    "reserve": "consume",
    "reserve-with-timeout": "consume",
    "release": "consume",
    "bury": "consume",
    "touch": "consume",
    "delete": "consume",  # of a job this connection reserved; else DELETE_OTHER_VERB
    # inspect
    "peek": "inspect",
    "peek-ready": "inspect",
    "peek-delayed": "inspect",
    "peek-buried": "inspect",
    "stats-job": "inspect",
    "stats-tube": "inspect",
    "list-tubes": "inspect",
    # manage
    "kick": "manage",
    "kick-job": "manage",
    "reserve-job": "manage",
    "pause-tube": "manage",
    # server-wide, tube-less
    "stats": "server",
}
"""Every beanstalkd 1.12 command name -> its verb class (or ``always`` / ``any``)."""

DELETE_OTHER_VERB: Final = "manage"
"""The verb of ``delete`` on a job that is *not* reserved by this connection."""

TUBE_COMBOS: Final = (
    *((c, v) for c, v in COMMAND_VERBS.items() if v in TUBE_VERBS),
    ("delete", DELETE_OTHER_VERB),
)
"""(command, verb) pairs a tube right can consist of; ``any_right`` asks about each of them."""

TUBE_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-+/;.$_()"
)
"""beanstalkd's NAME_CHARS (``docs/protocol.md`` section 2.5); all are literal in tube patterns."""

MAX_TUBE_PATTERN: Final = 200
"""Longest tube pattern a rule may name (beanstalkd's own limit on tube names)."""
MATCH_KEYS: Final = ("cn", "ou", "dns", "uri", "ip", "fingerprint", "spki", "issuer")
"""The certificate match keys a principal's ``match`` block can name."""

ALL: Final = "all"
"""The rule entry that means every verb class."""
