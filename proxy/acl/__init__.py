"""The access-control list package; see ``proxy.acl.policy`` (split along its seams next)."""

from proxy.acl.policy import *  # noqa: F403
from proxy.acl.policy import __all__
