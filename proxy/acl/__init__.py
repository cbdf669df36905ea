"""The access-control list: an already-parsed ACL document -> a compiled, immutable ``Policy``.

The package is split along its seams: ``verbs`` (the command table and verb classes),
``globs`` (linear-time matchers), ``policy`` (the compiled ``Policy`` and its answers),
``parse`` (the file format, ``parse_acl``) and ``lint`` (read-only diagnostics). Import the
public names from here (``from proxy.acl import Policy, parse_acl``). Every module is pure: no
asyncio, socket, ssl, click or yaml imports. The file format is documented in ``config/ACL.md``.
"""

from proxy.acl.lint import lint_acl, principal_mismatches
from proxy.acl.parse import parse_acl
from proxy.acl.policy import Decision, Policy, PutLimits, VisibleTubes
from proxy.acl.verbs import (
    ALWAYS,
    ANY,
    COMMAND_VERBS,
    DELETE_OTHER_VERB,
    MATCH_KEYS,
    TUBE_CHARS,
    TUBE_VERBS,
    VERBS,
)

__all__ = [
    "ALWAYS",
    "ANY",
    "COMMAND_VERBS",
    "DELETE_OTHER_VERB",
    "MATCH_KEYS",
    "TUBE_CHARS",
    "TUBE_VERBS",
    "VERBS",
    "Decision",
    "Policy",
    "PutLimits",
    "VisibleTubes",
    "lint_acl",
    "parse_acl",
    "principal_mismatches",
]
