"""beanstalk-proxy: a mutual-TLS, per-tube access-controlled front door for beanstalkd.

The package is split into a pure, synchronous core (``protocol``: beanstalkd framing in both
directions; ``identity``: certificate -> identity facts; ``acl``: principals and per-command
decisions; ``session``: one client connection's state machine joining them) and a thin asyncio
shell (``relay``: sockets, TLS and backpressure; ``cli``: the composition root that reads
configuration files and wires everything together).
"""

__version__ = "0.1.0"
