"""One client connection's state machine: parse, decide, serialize; pure and synchronous.

A ``Session`` joins the protocol parsers and the access policy for one client connection and
its one upstream connection. The relay feeds it client bytes (``feed_client``) and upstream
bytes (``feed_upstream``) and after each step carries out the one ``Output`` that ``output()``
returns (bytes for each side, audit records, read the client or not, half-close upstream,
close); nothing else crosses. The session forwards only canonical serializations of commands
it parsed and allowed, answers denied or malformed commands itself, and keeps every reply in
command order with a FIFO of pending entries (one per forwarded command; local replies wait
their turn behind earlier forwarded commands). It tracks what beanstalkd tracks per
connection (used tube, watch list, reserved jobs) so every decision is made against the
current policy, and it learns job-id -> tube from this connection's own ``INSERTED`` and
``RESERVED`` replies, asking beanstalkd with ``stats-job`` on the same upstream connection only
when a decision depends on it (then ``blocked`` is set until the answer arrives). An optional
``limiter`` (the relay's per-principal token bucket) turns a command into a local
``RATE_LIMITED`` reply instead of running it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from proxy.acl import DELETE_OTHER_VERB, TUBE_CHARS, Decision, Policy
from proxy.budget import Budget
from proxy.config import DENIAL_REPLY_MODES
from proxy.errors import ProtocolError
from proxy.protocol import (
    BAD_FORMAT,
    CRLF,
    JOB_ID_OPS,
    NAMES,
    NEED_DATA,
    NOT_FOUND,
    NOT_PERMITTED,
    OP_BURY,
    OP_DELETE,
    OP_ERROR,
    OP_IGNORE,
    OP_KICK,
    OP_KICK_JOB,
    OP_LIST_TUBE_USED,
    OP_LIST_TUBES,
    OP_LIST_TUBES_WATCHED,
    OP_PAUSE_TUBE,
    OP_PEEK,
    OP_PEEK_BURIED,
    OP_PEEK_DELAYED,
    OP_PEEK_READY,
    OP_PUT,
    OP_QUIT,
    OP_RELEASE,
    OP_RESERVE,
    OP_RESERVE_JOB,
    OP_RESERVE_WITH_TIMEOUT,
    OP_STATS,
    OP_STATS_JOB,
    OP_STATS_TUBE,
    OP_TOUCH,
    OP_USE,
    OP_WATCH,
    OUT_OF_MEMORY,
    RATE_LIMITED,
    UNKNOWN_COMMAND,
    BuryCmd,
    ClientParser,
    Command,
    ErrorCmd,
    JobCmd,
    JobIdCmd,
    KickCmd,
    NoArgCmd,
    Op,
    PauseCmd,
    PutCmd,
    ReleaseCmd,
    ReplyParser,
    ReserveCmd,
    TubeCmd,
    write_command,
)

if TYPE_CHECKING:
    from proxy.shadow import ShadowView


class PendingKind(IntEnum):
    """Pending-reply kinds (first item of each pending entry)."""

    PLAIN = 0  # pass the reply through
    LOCAL = 1  # (K_LOCAL, reply_bytes): a reply the proxy makes, in its turn
    PUT = 2  # (K_PUT, tube): learn INSERTED/BURIED id -> tube
    RESERVE = 3  # (K_RESERVE, tubes): learn RESERVED id; tubes = candidate tubes or ()
    JOB_DONE = 4  # (K_JOB_DONE, id): release/bury/delete: the job is no longer ours
    TOUCH = 5  # (K_TOUCH, id): NOT_FOUND means the job is no longer ours
    LOOKUP = 6  # (K_LOOKUP, cmd, verb): stats-job sent to learn a job's tube
    STATS_JOB = 7  # (K_STATS_JOB, id): the client's own stats-job, filtered by tube
    LIST_TUBES = 8  # filter the tube list to tubes the principal may see
    STATS = 9  # redact host-identifying fields
    BURY = 10  # (K_BURY, id): BURIED keeps the job this connection's for delete
    WAIT = 11  # (K_WAIT, tubes): a blocking reserve; its reply ends ``waiting``


K_PLAIN: Final = PendingKind.PLAIN
K_LOCAL: Final = PendingKind.LOCAL
K_PUT: Final = PendingKind.PUT
K_RESERVE: Final = PendingKind.RESERVE
K_JOB_DONE: Final = PendingKind.JOB_DONE
K_TOUCH: Final = PendingKind.TOUCH
K_LOOKUP: Final = PendingKind.LOOKUP
K_STATS_JOB: Final = PendingKind.STATS_JOB
K_LIST_TUBES: Final = PendingKind.LIST_TUBES
K_STATS: Final = PendingKind.STATS
K_BURY: Final = PendingKind.BURY
K_WAIT: Final = PendingKind.WAIT
#: A pending entry: its ``PendingKind``, then what its reply needs (see ``PendingKind``).
Pending = tuple[PendingKind, *tuple[Any, ...]]

_PLAIN: Final = (K_PLAIN,)
_LIST_TUBES: Final = (K_LIST_TUBES,)
_STATS: Final = (K_STATS,)

#: Pending entries beyond which the relay stops reading the client (local replies for denied
#: commands do not go upstream, so upstream backpressure alone would not bound them).
MAX_PENDING: Final = 4096
#: Commands naming a tube that beanstalkd answers NOT_FOUND when the tube does not exist.
NAMED_TUBE_OPS: Final = frozenset({OP_STATS_TUBE, OP_PAUSE_TUBE})
#: Bytes a client may send behind a blocking ``reserve`` before the relay stops reading it
#: (held commands are parsed only once the reserve has its reply).
MAX_HELD_BYTES: Final = 65536
#: Commands one turn (``feed_client``, ``resume``, or an answered lookup) runs at most. The
#: rest stays buffered (``backlog``) and the relay runs it in later event-loop turns, reading
#: nothing more meanwhile, so one client's pipelined input cannot hold the loop for long.
TURN_BUDGET: Final = 64
#: Job ids remembered per connection (oldest forgotten first; a forgotten id costs a lookup).
MAX_KNOWN_JOBS: Final = 1024
#: Reservations remembered per connection (oldest forgotten first). Once one was forgotten,
#: release/bury/touch/delete of a job not remembered cost a ``stats-job``: a job in state
#: ``reserved`` may be this connection's, and beanstalkd itself refuses (NOT_FOUND) a release,
#: bury, touch or delete of a job another connection reserved.
MAX_RESERVED: Final = 1024
#: Jobs this connection reserved and then buried, remembered so that it may still delete
#: them with consume (oldest forgotten first; a forgotten one needs manage, as for any job).
MAX_OWN_BURIED: Final = 1024
#: Pseudo-verb of release/bury/touch/delete on a job this connection reserved: consume or
#: manage on the job's tube.
OWN: Final = "own"
#: Pseudo-verb of ``delete`` on a job that may be this connection's: one it reserved and then
#: buried, or any job once a reservation was forgotten. ``OWN`` when a ``stats-job`` on this
#: connection shows it still buried by us (not kicked since) or reserved (beanstalkd deletes a
#: reserved job only for its reserver), otherwise ``DELETE_OTHER_VERB``.
MAYBE_OWN: Final = "maybe-own"
#: The job-id decisions (command, verb) whose outcome may depend on the job's tube.
JOB_DECISIONS: Final = (
    ("peek", "inspect"),
    ("stats-job", "inspect"),
    ("delete", "consume"),
    ("delete", DELETE_OTHER_VERB),
    ("release", "consume"),
    ("bury", "consume"),
    ("touch", "consume"),
    ("kick-job", "manage"),
    ("reserve-job", "manage"),
)
#: ``stats`` fields shown as they are to principals without the server class: facts about the
#: server's build and configuration, nothing about other tenants' work.
TENANT_SAFE_STATS: Final = frozenset(
    {b"version", b"max-job-size", b"draining", b"uptime", b"binlog-max-size"}
)
#: ``stats`` fields that name the host; "redacted" for principals without the server class
#: (every other field, a counter, reads 0).
REDACTED_STATS: Final = frozenset({b"hostname", b"os", b"platform", b"id"})


class PolicySource(Protocol):
    """Anything holding the current policy (the relay's ``PolicyHolder``)."""

    @property
    def current(self) -> Policy: ...


def _yaml_scalar(value: bytes) -> bytes:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in b"\"'":
        return value[1:-1]
    return value


def job_stats_fields(body: bytes) -> tuple[str, str]:
    """(tube, state) from a ``stats-job`` YAML body; raises ``ProtocolError`` if absent."""
    tube = state = None
    for raw in body.split(b"\n"):
        key, sep, value = raw.partition(b":")
        if not sep:
            continue
        if key == b"tube":
            tube = _yaml_scalar(value)
        elif key == b"state":
            state = _yaml_scalar(value)
    if tube is None or state is None:
        raise ProtocolError("stats-job reply from upstream lacks tube or state")
    return tube.decode("ascii", "replace"), state.decode("ascii", "replace")


def denial_replies(mode: str) -> tuple[tuple[bytes, ...], bytes]:
    """(reply to a denied command, indexed by op; reply to a rate-limited command) for an
    ``acl_denial_reply`` mode.

    ``explicit``: ``NOT_PERMITTED`` and ``RATE_LIMITED``, words beanstalkd never sends, which
    some client libraries (Pheanstalk, beaneater) do not treat as errors. ``compatible``: only
    words every measured library raises on (docs/denial-matrix.md): ``NOT_FOUND`` for job-id
    commands (what beanstalkd answers for a job another connection holds) and for
    ``stats-tube``/``pause-tube`` (its answer for a tube that does not exist, so a denial does
    not even tell that the tube exists), ``UNKNOWN_COMMAND`` for every other command,
    ``OUT_OF_MEMORY`` ("try again later") when rate limited. A job in a tube the principal
    may not see answers ``NOT_FOUND`` in both modes."""
    known = _DENIAL_REPLIES.get(mode)
    if known is not None:
        return known
    if mode == "explicit":
        replies = (NOT_PERMITTED,) * len(NAMES), RATE_LIMITED
    elif mode == "compatible":
        table = tuple(
            NOT_FOUND if op in JOB_ID_OPS or op in NAMED_TUBE_OPS else UNKNOWN_COMMAND
            for op in range(len(NAMES))
        )
        replies = table, OUT_OF_MEMORY
    else:
        raise ValueError(f"unknown denial mode {mode!r}; expected one of {DENIAL_REPLY_MODES}")
    _DENIAL_REPLIES[mode] = replies
    return replies


#: ``denial_replies`` by mode, made once (every session asks at its start).
_DENIAL_REPLIES: dict[str, tuple[tuple[bytes, ...], bytes]] = {}


def ok_reply(yaml: bytes) -> bytes:
    """An ``OK <n>`` reply carrying ``yaml`` as its body."""
    return b"OK %d\r\n%s\r\n" % (len(yaml), yaml)


class _NoEntries(OrderedDict[Any, Any]):
    """The empty ``jobs``, ``reserved`` and ``buried`` every session starts with, shared (an
    ``OrderedDict`` each is 384 B per connection that most never use): read it like any empty
    one; a session stores its first entry into its own, and a store into this one raises."""

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("NO_ENTRIES is shared: give the session its own OrderedDict first")

    def setdefault(self, key: Any, default: Any = None) -> Any:
        raise TypeError("NO_ENTRIES is shared: give the session its own OrderedDict first")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("NO_ENTRIES is shared: give the session its own OrderedDict first")


NO_ENTRIES: Final[OrderedDict[Any, Any]] = _NoEntries()
#: The ``denied_counts`` of a session that denied nothing yet (shared; a list from the first).
NO_COUNTS: Final[tuple[int, ...]] = (0,) * len(NAMES)


#: The ``Session`` method handling each op, in ``Op`` order (``Session._handlers``).
_HANDLER_NAMES: Final[tuple[str, ...]] = tuple(
    {
        OP_PUT: "_h_put",
        OP_USE: "_h_use",
        OP_RESERVE: "_h_reserve",
        OP_RESERVE_WITH_TIMEOUT: "_h_reserve",
        OP_RESERVE_JOB: "_h_job",
        OP_DELETE: "_h_job",
        OP_RELEASE: "_h_own_job",
        OP_BURY: "_h_own_job",
        OP_TOUCH: "_h_own_job",
        OP_WATCH: "_h_watch",
        OP_IGNORE: "_h_ignore",
        OP_PEEK: "_h_job",
        OP_PEEK_READY: "_h_used_tube",
        OP_PEEK_DELAYED: "_h_used_tube",
        OP_PEEK_BURIED: "_h_used_tube",
        OP_KICK: "_h_used_tube",
        OP_KICK_JOB: "_h_job",
        OP_STATS_JOB: "_h_stats_job",
        OP_STATS_TUBE: "_h_named_tube",
        OP_STATS: "_h_stats",
        OP_LIST_TUBES: "_h_list_tubes",
        OP_LIST_TUBE_USED: "_forward",
        OP_LIST_TUBES_WATCHED: "_forward",
        OP_PAUSE_TUBE: "_h_named_tube",
        OP_QUIT: "_h_quit",
        OP_ERROR: "_h_error",
    }[op]
    for op in Op
)


#: The empty payload of an ``Output`` with nothing for one side.
EMPTY: Final = b""


class Output:
    """What the relay carries out after one session step (``Session.output``), nothing else.

    ``to_client`` / ``to_upstream``: bytes to write (``EMPTY`` when none); ``denials``: audit
    records of denied commands, to count and log (``()`` when none); ``release``: budget bytes
    of complete put bodies, free once ``to_upstream`` was handed to the upstream transport;
    ``close``: a reason when upstream misbehaved and both sides close now (after writing
    ``to_client``; nothing goes upstream and ``release`` is 0: the budget stays with the
    session, which the relay's close takes back); ``half_close``: upstream should be
    half-closed now (level-triggered: it stays true, the relay does it once); ``read``: the
    client may be read, as far as the session is concerned (the relay adds its transports'
    backpressure); ``backlog``: commands are buffered for a next turn (``resume``), read
    nothing more until it ran; ``pending``: replies from upstream are outstanding (the
    relay's latency sampling).

    A session refills one ``Output`` object at each ``output()`` (no allocation per step); the
    value is valid until the next call. Equality compares every field (for transcript tests).
    """

    __slots__ = (
        "backlog",
        "close",
        "denials",
        "half_close",
        "pending",
        "read",
        "release",
        "to_client",
        "to_upstream",
    )
    #: The fields in the order of the docstring (``repr``, equality).
    FIELDS: Final = (
        "to_client",
        "to_upstream",
        "denials",
        "release",
        "close",
        "half_close",
        "read",
        "backlog",
        "pending",
    )

    def __init__(
        self,
        to_client: bytes | bytearray = EMPTY,
        to_upstream: bytes | bytearray = EMPTY,
        denials: Sequence[dict[str, Any]] = (),
        release: int = 0,
        close: str | None = None,
        half_close: bool = False,
        read: bool = True,
        backlog: bool = False,
        pending: bool = False,
    ) -> None:
        self.to_client = to_client
        self.to_upstream = to_upstream
        self.denials = denials
        self.release = release
        self.close = close
        self.half_close = half_close
        self.read = read
        self.backlog = backlog
        self.pending = pending

    def _fields(self) -> tuple[Any, ...]:
        return tuple(
            bytes(v) if isinstance(v, bytearray) else list(v) if name == "denials" else v
            for name in self.FIELDS
            for v in (getattr(self, name),)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Output):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        default = Output()._fields()
        shown = [
            f"{name}={value!r}"
            for name, value, unset in zip(self.FIELDS, self._fields(), default, strict=True)
            if value != unset
        ]
        return f"Output({', '.join(shown)})"


class DrainCause(Enum):
    """Why a session drains (``Session.drain_cause``; the logged text is ``close_reason``).

    ``QUIT``: the client sent ``quit`` (beanstalkd closes by itself, upstream is not
    half-closed before the client's EOF); ``CLIENT_EOF``: the client half-closed;
    ``PROTOCOL_ERROR``: the client sent something unparseable; ``PROXY``: the relay's own
    reason (idle timeout, connection lifetime, shutdown), given to ``Session.stop``."""

    QUIT = "quit"
    CLIENT_EOF = "client closed"
    PROTOCOL_ERROR = "protocol error"
    PROXY = "proxy"


#: Drain causes of a connection the client ended (``closed_by=client`` in the close event).
_CLIENT_CAUSES: Final = frozenset({DrainCause.QUIT, DrainCause.CLIENT_EOF})


class Session:
    """See the module docstring. The relay reads nothing of this state itself: after each step
    (``feed_client``, ``feed_upstream``, ``client_eof``, ``resume``, ``stop``,
    ``budget_granted``) it calls ``output()`` once and carries out the ``Output`` it returns:
    the bytes for each side, the audit records, the budget to release, whether to read the
    client, run a next turn, half-close upstream or close. Those decisions are pure, on this
    state: ``to_upstream`` / ``to_client``, the bytes to send; ``blocked``: waiting for a
    lookup reply (the client is not read); ``draining``: the client will send nothing more,
    once ``blocked`` is false upstream is half-closed and its close ends the connection;
    ``drain_cause`` says why (a ``DrainCause``), ``close_reason`` is the text logged for it;
    ``failed``: a reason string when the upstream misbehaved and both sides must close now;
    ``denials``: audit records of denied commands; ``backlog``: a turn stopped after
    ``TURN_BUDGET`` commands with input still buffered, the relay calls ``resume`` in a later
    event-loop turn (and reads nothing more until then); ``yields`` counts those stops.
    ``reads_client`` and ``half_close_due`` are the two rules ``output`` applies;
    ``upstream_closed`` says how a close by upstream is logged, ``has_unrun_commands``
    whether a client that closed is finished first; the relay calls ``stop`` to drain for its
    own reasons.

    ``budget`` (optional, shared by all sessions of the proxy): every allowed ``put`` reserves
    its declared size there at its command line, as ``budget_key``. While the reservation
    waits, ``stalled`` is its size: the body is not read (the relay stops reading the client)
    until the relay calls ``budget_granted``. ``receiving`` is the reservation of the body
    being read, ``queued`` the reserved bytes of bodies complete (in ``to_upstream``, or
    dropped by a denial or a rate limit): ``output`` hands ``queued`` over as
    ``Output.release`` with ``to_upstream``, and the relay releases ``take_budget()`` when it
    closes.

    ``limiter`` (set by the relay, ``None`` = unlimited): called once per parsed command other
    than ``quit`` and the proxy's own error replies; when it returns false the command is not
    run, ``RATE_LIMITED`` is answered in its turn and ``rate_limited`` counts it (such a
    command is not in ``op_counts``).
    """

    __slots__ = (
        "_any_cache",
        "_budget_key",
        "_cache",
        "_policy",
        "_put_refusal",
        "_puts_free",
        "_rate_limited_reply",
        "_replies",
        "_source",
        "_tracking",
        "_uniform_cache",
        "backlog",
        "blocked",
        "budget",
        "buried",
        "close_reason",
        "denials",
        "denied_counts",
        "drain_cause",
        "draining",
        "ended",
        "failed",
        "forgot_reserved",
        "jobs",
        "limiter",
        "op_counts",
        "out",
        "parser",
        "pending",
        "principal",
        "queued",
        "rate_limited",
        "receiving",
        "replies",
        "reserved",
        "shadow",
        "stalled",
        "to_client",
        "to_upstream",
        "use_denied",
        "used",
        "waiting",
        "watched",
        "yields",
    )
    _handlers: ClassVar[tuple[Callable[[Session, Any], None], ...]]  # set below the class

    def __init__(
        self,
        policy: PolicySource,
        principal: str,
        max_job_size: int = 65535,
        limiter: Callable[[], bool] | None = None,
        denial_reply: str = "compatible",
        budget: Budget | None = None,
        budget_key: Hashable | None = None,
    ) -> None:
        self._source = policy
        self.principal = principal
        self.parser = ClientParser(max_job_size)
        self.replies = ReplyParser()
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.pending: deque[Pending] = deque()
        self.used = "default"
        self.watched: dict[str, None] = {"default": None}
        self.jobs: OrderedDict[int, str] = NO_ENTRIES  # its own from the first entry on
        self.reserved: OrderedDict[int, tuple[str, ...]] = NO_ENTRIES  # (likewise)
        self.forgot_reserved = False  # a reservation was forgotten (MAX_RESERVED)
        # jobs this connection reserved, then buried: job id -> candidate tubes
        self.buried: OrderedDict[int, tuple[str, ...]] = NO_ENTRIES  # (likewise)
        # after a denied ``use``: (the tube, the reply); commands on the used tube are refused
        # until a ``use`` is allowed, so they never land in the tube used before
        self.use_denied: tuple[str, bytes] | None = None
        self._replies, self._rate_limited_reply = denial_replies(denial_reply)
        self._put_refusal: tuple[Decision, str, bytes | None] | None = None  # see _put_header
        self.parser.on_put = self._put_header
        self._puts_free = False  # every put of this principal is allowed (no early decision)
        self.budget = budget
        self._budget_key: Hashable = self if budget_key is None else budget_key
        self.stalled = 0  # size of the put waiting for the budget (its body not read yet)
        self.receiving = 0  # budget reserved by the put body being read
        self.queued = 0  # budget reserved by complete bodies, until the relay releases it
        self.blocked = False
        # a blocking reserve is outstanding: later commands are held (not parsed, not
        # forwarded) until its reply, then decided under the policy in force at that moment
        self.waiting = False
        self.ended = False  # the client sent EOF; complete commands are still run
        self.backlog = False
        self.yields = 0
        self.draining = False
        self.failed: str | None = None
        self.close_reason = ""  # the text logged as the close event's reason
        self.drain_cause: DrainCause | None = None  # set with close_reason
        self.out = Output()  # refilled by ``output``: the relay's orders after each step
        self.denials: list[dict[str, Any]] = []
        self.op_counts = [0] * len(NAMES)  # commands parsed, by op (read by metrics)
        self.denied_counts: Sequence[int] = NO_COUNTS  # of which denied (a list from the first)
        self.limiter = limiter
        self.rate_limited = 0  # commands answered RATE_LIMITED (read by metrics)
        self._policy: Policy | None = None
        self._cache: dict[tuple[str, str, str | None], Decision] = {}
        self._any_cache: dict[str, Decision] = {}
        self._uniform_cache: dict[tuple[str, str], bool] = {}
        self._tracking: bool | None = None  # does any job-id decision need a job's tube?
        # the shadow policy's view of this connection (proxy/shadow.py); None: no shadow
        self.shadow: ShadowView | None = None

    # --- policy access, cached per policy object ----------------------------------------------

    def _fresh_policy(self) -> Policy:
        policy = self._source.current
        if policy is not self._policy:
            self._policy = policy
            self._cache.clear()
            self._any_cache.clear()
            self._uniform_cache.clear()
            self._tracking = None
            # A principal whose every put is allowed needs no early decision on put lines.
            free = self._uniform("put", "produce") and not policy.has_put_limits(self.principal)
            self._puts_free = free
            self.parser.on_put = None if free and self.budget is None else self._put_header
        return policy

    def set_principal(self, principal: str) -> None:
        """Rename this connection's principal (after a reload re-mapped its certificate)."""
        self.principal = principal
        self._policy = None

    def set_shadow(self, view: ShadowView | None) -> None:
        """Decide every command under a shadow policy too (``None``: no more)."""
        self.shadow = view

    def _decide(self, command: str, verb: str, tube: str | None) -> Decision:
        policy = self._fresh_policy()
        key = (command, verb, tube)
        d = self._cache.get(key)
        if d is None:
            if len(self._cache) >= 4096:
                self._cache.clear()
            d = self._cache[key] = policy.decide(self.principal, command, verb, tube)
        return d

    def _visible(self, tube: str) -> Decision:
        policy = self._fresh_policy()
        d = self._any_cache.get(tube)
        if d is None:
            if len(self._any_cache) >= 4096:
                self._any_cache.clear()
            d = self._any_cache[tube] = policy.any_right(self.principal, tube)
        return d

    def _uniform(self, command: str, verb: str) -> bool:
        policy = self._fresh_policy()
        key = (command, verb)
        u = self._uniform_cache.get(key)
        if u is None:
            u = self._uniform_cache[key] = policy.uniform(self.principal, command, verb)
        return u

    # --- client side --------------------------------------------------------------------------

    def feed_client(self, data: bytes) -> None:
        """Take bytes from the client; parse and act on every complete command."""
        if self.draining or self.failed:
            return
        self.parser.feed(data)
        self._run()

    def resume(self) -> None:
        """Run the next turn of commands already buffered (after ``backlog`` was set)."""
        self.backlog = False
        if not self.draining and not self.failed:
            self._run()

    def budget_granted(self) -> None:
        """The stalled put's reservation was granted (``Budget.release``/``cancel`` returned
        this session's key): its body may be read; the relay runs ``resume`` next."""
        self.receiving = self.stalled
        self.stalled = 0
        self.parser.admit()
        self.backlog = True

    def client_eof(self) -> None:
        """The client half-closed: no more commands. Those complete are still run, even behind
        a blocking ``reserve`` (beanstalkd answers a waiting ``reserve`` of a half-closed
        client ``TIMED_OUT`` and then runs what follows; the relay's half-close upstream does
        the same here); then the session drains. An incomplete command is dropped."""
        if self.ended:
            return
        self.ended = True  # noted even while draining: it decides the half-close after quit
        if self.draining:
            return
        if not self.close_reason:
            self.close_reason = "client closed"
            self.drain_cause = DrainCause.CLIENT_EOF
        self._run()

    def stop(self, reason: str) -> None:
        """The relay drains this session for its own ``reason`` (idle timeout, connection
        lifetime, shutdown): no more commands are read; a drain already under way keeps its
        cause."""
        if not self.draining:
            self.draining = True
            self.close_reason = reason
            self.drain_cause = DrainCause.PROXY

    # --- the relay's orders after each step, and what it takes when closing ----------------

    def output(self, upstream_open: bool = True) -> Output:
        """The step's ``Output`` (the relay calls this once after each ``feed_client``,
        ``feed_upstream``, ``client_eof``, ``resume``, ``stop`` and ``budget_granted``): the
        bytes, denials and released budget that accumulated (taken: the next call has only
        what came after) and the decisions on the state now. ``upstream_open`` false: upstream
        is not connected yet, so its bytes (and the budget their bodies hold) stay buffered
        for a later call and no half-close is due. Returns ``self.out``, refilled."""
        out = self.out
        data = self.to_client
        if data:
            self.to_client = bytearray()
            out.to_client = data
        else:
            out.to_client = EMPTY
        denials = self.denials
        if denials:
            self.denials = []
            out.denials = denials
        else:
            out.denials = ()
        failed = out.close = self.failed
        if upstream_open and failed is None:  # closing: bytes and budget stay for close()
            data = self.to_upstream
            if data:
                self.to_upstream = bytearray()
                out.to_upstream = data
            else:
                out.to_upstream = EMPTY
            out.release = self.queued
            self.queued = 0
            out.half_close = self.draining and self.half_close_due()
        else:
            out.to_upstream = EMPTY
            out.release = 0
            out.half_close = False
        pending = len(self.pending)
        if self.blocked or self.stalled or self.waiting or self.draining or pending > MAX_PENDING:
            out.read = self.reads_client()
        else:
            out.read = True  # what reads_client answers, without the call (hot path)
        out.pending = pending > 0
        out.backlog = self.backlog
        return out

    def take_client(self) -> bytearray:
        """Closing: the bytes still for the client (``to_client``)."""
        data = self.to_client
        self.to_client = bytearray()
        return data

    def take_budget(self) -> tuple[int, int]:
        """Closing: ``(stalled, held)``, the size of the put waiting for the budget (to
        cancel) and everything else this session holds of it (to release)."""
        stalled, held = self.stalled, self.receiving + self.queued
        self.stalled = self.receiving = self.queued = 0
        return stalled, held

    def take_rate_limited(self) -> int:
        """``rate_limited`` so far (the metrics fold it under the principal before a rename)."""
        n = self.rate_limited
        self.rate_limited = 0
        return n

    # --- what the relay does next (pure decisions on the state above) -----------------------

    def reads_client(self) -> bool:
        """Whether the client may be read now, as far as the session is concerned (the relay
        adds its transports' backpressure). Not while a lookup or a put waiting for the budget
        holds it, behind a blocking ``reserve`` only up to ``MAX_HELD_BYTES`` (those commands
        are decided when it returns), nor with more than ``MAX_PENDING`` replies outstanding.
        While draining only after ``quit`` and before the client's EOF: its bytes are
        ignored, it is read to notice the EOF. (``output()`` answers True without this call
        when none of the flags below is set: a new condition must join its gate too.)"""
        return not (
            self.blocked
            or self.stalled
            or (self.waiting and self.parser.buffered > MAX_HELD_BYTES)
            or (self.draining and (self.drain_cause is not DrainCause.QUIT or self.ended))
            or len(self.pending) > MAX_PENDING
        )

    def half_close_due(self) -> bool:
        """Whether upstream should be half-closed now (the relay does it once): when draining
        and no lookup is outstanding. After ``quit`` only once the client sent EOF too:
        beanstalkd closes by itself after answering what came before the quit, and a
        half-close would turn a blocking ``reserve`` into ``TIMED_OUT``."""
        return (
            self.draining
            and not self.blocked
            and (self.ended or self.drain_cause is not DrainCause.QUIT)
        )

    def has_unrun_commands(self) -> bool:
        """Whether commands the client sent still wait to run (a put waiting for the budget,
        a backlog of turns): a client that closes cleanly now is not closed by the relay,
        the session finishes them and drains first, as beanstalkd would."""
        return bool(self.stalled or self.backlog)

    def upstream_closed(self, reason: str) -> tuple[str, str] | None:
        """Upstream closed its side: the close event's ``(reason, closed_by)`` when that ends
        the drain (the client's ``quit`` or EOF: ``client``; otherwise ``proxy``), or ``None``
        when the session was not draining and upstream was lost (``reason`` is its error)."""
        if not self.draining:
            return None
        by = "client" if self.drain_cause in _CLIENT_CAUSES else "proxy"
        return self.close_reason or reason, by

    def may_keep_waiting(self) -> bool:
        """Whether the outstanding blocking ``reserve`` is still allowed on every tube it
        waits on, under the current policy (the relay closes the connection otherwise)."""
        if not self.waiting:
            return True
        for entry in self.pending:
            if entry[0] == K_WAIT:
                return all(self._decide("reserve", "consume", t).allowed for t in entry[1])
        return True

    def _run(self) -> None:
        parser = self.parser
        handlers = self._handlers
        limiter = self.limiter
        shadow = self.shadow
        budget = TURN_BUDGET
        self.backlog = False
        try:
            while not self.blocked and not self.draining:
                if self.waiting and not self.ended:
                    return  # held until the blocking reserve has its reply
                if not budget:
                    if parser.buffered:
                        self.backlog = True
                        self.yields += 1
                    return
                budget -= 1
                cmd = parser.next_command()
                if cmd is NEED_DATA:
                    if self.ended and not self.blocked and not self.stalled:
                        self.draining = True
                    return
                if self.receiving:  # this is the reserved put (or its EXPECTED_CRLF)
                    self.queued += self.receiving
                    self.receiving = 0
                op = cmd[0]
                if limiter is not None and op != OP_QUIT and op != OP_ERROR and not limiter():
                    # Not run (a put's body is already consumed); answered in its turn.
                    self.rate_limited += 1
                    self._local(self._rate_limited_reply)
                    continue
                self.op_counts[op] += 1
                if shadow is None:
                    handlers[op](self, cmd)
                else:
                    shadow.run(self, handlers[op], cmd)
        except ProtocolError as exc:
            self._local(BAD_FORMAT)
            self.draining = True
            self.close_reason = f"protocol error: {exc}"
            self.drain_cause = DrainCause.PROTOCOL_ERROR

    def _local(self, reply: bytes) -> None:
        if self.pending:
            self.pending.append((K_LOCAL, reply))
        else:
            self.to_client += reply

    def _forward(self, cmd: Command, entry: Pending = _PLAIN) -> None:
        write_command(self.to_upstream, cmd)
        self.pending.append(entry)

    def _deny(
        self,
        cmd: Command,
        decision: Decision,
        tube: str | None,
        job: int | None = None,
        reply: bytes | None = None,
    ) -> None:
        if reply is None:
            reply = self._replies[cmd[0]]
        self._audit(cmd, decision, tube, job, reply)
        self._local(reply)

    def _audit(
        self, cmd: Command, decision: Decision, tube: str | None, job: int | None, reply: bytes
    ) -> None:
        counts = self.denied_counts
        if not isinstance(counts, list):
            counts = self.denied_counts = [0] * len(NAMES)
        counts[cmd[0]] += 1
        self.denials.append(
            {
                "principal": self.principal,
                "command": NAMES[cmd[0]],
                "tube": tube,
                "job": job,
                "rule": decision.rule,
                "reply": reply.decode().strip(),
            }
        )

    def _check(self, cmd: Command, verb: str, tube: str | None) -> bool:
        d = self._decide(NAMES[cmd[0]], verb, tube)
        if d.allowed:
            return True
        self._deny(cmd, d, tube)
        return False

    def _h_error(self, cmd: ErrorCmd) -> None:
        self._local(cmd[1])

    def _h_quit(self, cmd: NoArgCmd) -> None:
        # beanstalkd answers everything before the quit, then closes: forward it (it has no
        # reply, so nothing is pending for it) and drain.
        write_command(self.to_upstream, cmd)
        self.draining = True
        self.close_reason = "quit"
        self.drain_cause = DrainCause.QUIT

    def _tracks_jobs(self) -> bool:
        """Whether job ids must be remembered: only when some job-id decision of this
        principal depends on the job's tube (never for a principal allowed everything).
        Called right after a ``_decide`` of the same command, which already refreshed the
        policy (resetting ``_tracking`` if it changed): the hot path checks it only once."""
        tracking = self._tracking
        if tracking is None:
            tracking = self._tracking = not all(self._uniform(c, v) for c, v in JOB_DECISIONS)
        return tracking

    @staticmethod
    def _denied_use(denied: tuple[str, bytes]) -> tuple[Decision, str, bytes]:
        """While the last ``use`` (``denied``: its tube and reply) was denied: (decision, tube,
        reply) for any command on the used tube (a client library that missed the denial
        believes it uses that tube)."""
        tube, reply = denied
        rule = f"use {tube} was denied; commands on the used tube wait for an allowed use"
        return Decision(False, rule), tube, reply

    def _put_denial(
        self, pri: int, delay: int, ttr: int, size: int
    ) -> tuple[Decision, str, bytes | None] | None:
        """Why a ``put`` may not run now, as (decision, tube, reply or None for the usual
        denial reply), or ``None`` when it may."""
        if self.use_denied is not None:
            return self._denied_use(self.use_denied)
        tube = self.used
        d = self._decide("put", "produce", tube)
        if not d.allowed:
            return d, tube, None
        limits = d.limits
        if limits is not None:
            broken = limits.violation(pri, delay, ttr, size)
            if broken:
                return Decision(False, f"{d.rule}: {broken}"), tube, None
        return None

    def _put_header(self, pri: int, delay: int, ttr: int, size: int) -> bool | None:
        """``ClientParser.on_put``: decide a ``put`` from its command line, before its body is
        buffered. A refused one has its body discarded as it streams in (never held) and is
        answered in its turn by ``_h_put``; an allowed one is decided again once its body has
        arrived (a reload may land during the upload). An allowed one reserves its size in the
        budget first; ``None`` when it must wait for it (see ``stalled``)."""
        if not self._puts_free or self._source.current is not self._policy:
            refusal = self._put_denial(pri, delay, ttr, size)
            if refusal is not None:
                self._put_refusal = refusal
                return False
        budget = self.budget
        if budget is not None and size:
            if not budget.acquire(self._budget_key, size):
                self.stalled = size
                return None
            self.receiving = size
        return True

    def _h_put(self, cmd: PutCmd) -> None:
        body = cmd[4]
        denial: tuple[Decision, str, bytes | None] | None
        if body is None:  # refused from its command line; the body was discarded
            denial = self._put_refusal or (
                Decision(False, "refused at its put line"),
                self.used,
                None,
            )
            self._put_refusal = None
        else:
            denial = self._put_denial(cmd[1], cmd[2], cmd[3], len(body))
        if denial is not None:
            decision, tube, reply = denial
            self._deny(cmd, decision, tube, None, reply)
            return
        write_command(self.to_upstream, cmd)
        self.pending.append((K_PUT, self.used) if self._tracks_jobs() else _PLAIN)

    def _h_use(self, cmd: TubeCmd) -> None:
        tube = cmd[1]
        d = self._visible(tube)
        if not d.allowed:
            reply = self._replies[cmd[0]]
            self.use_denied = (tube, reply)
            self._deny(cmd, d, tube, None, reply)
            return
        self.used = tube
        self.use_denied = None
        self._forward(cmd)

    def _h_watch(self, cmd: TubeCmd) -> None:
        tube = cmd[1]
        if self._check(cmd, "consume", tube):
            self.watched[tube] = None
            self._forward(cmd)

    def _h_ignore(self, cmd: TubeCmd) -> None:
        tube = cmd[1]
        if tube in self.watched and len(self.watched) > 1:
            del self.watched[tube]
        self._forward(cmd)

    def _h_reserve(self, cmd: ReserveCmd) -> None:
        name = NAMES[cmd[0]]
        for tube in self.watched:
            d = self._decide(name, "consume", tube)
            if not d.allowed:
                self._deny(cmd, d, tube)
                return
        if cmd[0] is OP_RESERVE or cmd[1] > 0:
            self._forward(cmd, (K_WAIT, tuple(self.watched)))
            self.waiting = True
        else:
            self._forward(cmd, (K_RESERVE, tuple(self.watched)))

    def _h_used_tube(self, cmd: NoArgCmd | KickCmd) -> None:
        if self.use_denied is not None:
            decision, tube, reply = self._denied_use(self.use_denied)
            self._deny(cmd, decision, tube, None, reply)
            return
        verb = "manage" if cmd[0] == OP_KICK else "inspect"
        if self._check(cmd, verb, self.used):
            self._forward(cmd)

    def _h_named_tube(self, cmd: TubeCmd | PauseCmd) -> None:
        verb = "manage" if cmd[0] == OP_PAUSE_TUBE else "inspect"
        if self._check(cmd, verb, cmd[1]):
            self._forward(cmd)

    def _h_stats(self, cmd: NoArgCmd) -> None:
        if self._decide("stats", "server", None).allowed:
            self._forward(cmd)
        else:
            self._forward(cmd, _STATS)

    def _h_list_tubes(self, cmd: NoArgCmd) -> None:
        if self._uniform("list-tubes", "inspect"):
            self._forward(cmd)
        else:
            self._forward(cmd, _LIST_TUBES)

    # --- job-id commands ------------------------------------------------------------------

    def _job_verb(self, cmd: JobIdCmd) -> str:
        op = cmd[0]
        if op == OP_DELETE:
            job = cmd[1]
            if job in self.reserved:
                return OWN
            if job in self.buried or self.forgot_reserved:
                return MAYBE_OWN
            return DELETE_OTHER_VERB
        if op in (OP_PEEK, OP_STATS_JOB):
            return "inspect"
        if op in (OP_RELEASE, OP_BURY, OP_TOUCH):
            return OWN
        return "manage"  # kick-job, reserve-job

    def _decide_job_verb(self, command: str, verb: str, tube: str) -> Decision:
        """``_decide`` that also understands ``OWN``: a job this connection reserved may be
        released, buried, touched or deleted with consume *or* manage on its tube (a job
        taken with ``reserve-job``, a manage command, must not be stuck until its TTR)."""
        if verb != OWN:
            if verb == MAYBE_OWN:  # not confirmed still buried: the ordinary rule
                verb = DELETE_OTHER_VERB
            return self._decide(command, verb, tube)
        d = self._decide(command, "consume", tube)
        if not d.allowed:
            managed = self._decide(command, "manage", tube)
            if managed.allowed:
                return managed
        return d

    def _uniform_job_verb(self, command: str, verb: str) -> bool:
        if verb == MAYBE_OWN:
            return self._uniform(command, DELETE_OTHER_VERB)
        if verb != OWN:
            return self._uniform(command, verb)
        return self._uniform(command, "consume") or self._uniform(command, "manage")

    def _known_tubes(self, job: int) -> tuple[str, ...]:
        """Tubes the job is known to be in: one tube, or the watch list it was reserved from."""
        tube = self.jobs.get(job)
        if tube is not None:
            return (tube,)
        tubes = self.reserved.get(job)
        if tubes is None:
            tubes = self.buried.get(job, ())
        return tubes

    def _h_stats_job(self, cmd: JobCmd) -> None:
        if self._uniform("stats-job", "inspect"):
            self._forward(cmd)
            return
        tubes = self._known_tubes(cmd[1])
        job = cmd[1]
        if (
            (job in self.reserved or job in self.buried)
            and tubes
            and all(self._decide_job_verb("stats-job", OWN, t).allowed for t in tubes)
        ):
            # The connection holds this job (beaneater asks stats-job before every release
            # and bury): consume or manage on its tube suffices, as for release itself.
            self._forward(cmd)
            return
        if len(tubes) == 1:
            self._decide_job(cmd, "inspect", tubes[0])
        else:
            # The reply itself tells the tube: decide when it arrives, no extra command.
            self._forward(cmd, (K_STATS_JOB, cmd[1]))

    def _h_own_job(self, cmd: JobIdCmd) -> None:
        """release, bury, touch: only jobs this connection reserved exist for these."""
        job = cmd[1]
        if (
            job not in self.reserved
            and not self.forgot_reserved
            and not self._uniform_job_verb(NAMES[cmd[0]], OWN)
        ):
            # beanstalkd would answer NOT_FOUND: every reservation of this connection passed
            # through this session, so a job not in ``reserved`` is not reserved here.
            self._local(NOT_FOUND)
            return
        self._h_job(cmd)

    def _h_job(self, cmd: JobIdCmd) -> None:
        verb = self._job_verb(cmd)
        name = NAMES[cmd[0]]
        tubes = self._known_tubes(cmd[1])
        if not self._job_limits_unknown(cmd, tubes):
            if self._uniform_job_verb(name, verb) or (
                tubes and all(self._decide_job_verb(name, verb, t).allowed for t in tubes)
            ):
                self._send_job_cmd(cmd, tubes)
                return
            if len(tubes) == 1 and verb != MAYBE_OWN:
                self._decide_job(cmd, verb, tubes[0])
                return
        # Unknown (or ambiguous) tube: ask beanstalkd on this connection, hold the client.
        self.to_upstream += b"stats-job %d\r\n" % cmd[1]
        self.pending.append((K_LOOKUP, cmd, verb))
        self.blocked = True

    def _decide_job(self, cmd: JobIdCmd, verb: str, tube: str) -> None:
        d = self._decide_job_verb(NAMES[cmd[0]], verb, tube)
        if d.allowed:
            self._send_job_cmd(cmd, (tube,))
        elif not self._visible(tube).allowed:
            # A job in a tube the principal cannot see answers as if it did not exist.
            self._deny(cmd, d, tube, cmd[1], NOT_FOUND)
        else:
            self._deny(cmd, d, tube, cmd[1])
        if cmd[0] == OP_DELETE and not d.allowed:
            self.buried.pop(cmd[1], None)

    def _job_limits_unknown(self, cmd: JobIdCmd, tubes: tuple[str, ...]) -> bool:
        """A ``release``/``bury`` whose producer constraints depend on a tube not yet known."""
        return (
            cmd[0] in (OP_RELEASE, OP_BURY)
            and len(tubes) != 1
            and self._fresh_policy().has_put_limits(self.principal)
        )

    def _breaks_put_limits(self, cmd: ReleaseCmd | BuryCmd, tube: str) -> bool:
        """Producer constraints bind ``release`` (priority, delay) and ``bury`` (priority):
        those of the rule that grants produce on the job's tube, none if no rule does.
        Denies (and answers) the command when it breaks them."""
        d = self._decide("put", "produce", tube)
        limits = d.limits
        if limits is None:
            return False
        broken = limits.requeue_violation(cmd[2], cmd[3] if cmd[0] is OP_RELEASE else None)
        if broken is None:
            return False
        self._deny(cmd, Decision(False, f"{d.rule}: {broken}"), tube, cmd[1])
        return True

    def _send_job_cmd(self, cmd: JobIdCmd, tubes: tuple[str, ...]) -> None:
        op = cmd[0]
        if (
            cmd[0] in (OP_RELEASE, OP_BURY)
            and len(tubes) == 1
            and self._fresh_policy().has_put_limits(self.principal)
            and self._breaks_put_limits(cmd, tubes[0])
        ):
            return
        if op == OP_BURY:
            self._forward(cmd, (K_BURY, cmd[1]))
        elif op in (OP_RELEASE, OP_DELETE):
            self._forward(cmd, (K_JOB_DONE, cmd[1]))
        elif op == OP_TOUCH:
            self._forward(cmd, (K_TOUCH, cmd[1]))
        elif op == OP_RESERVE_JOB:
            self._forward(cmd, (K_RESERVE, tubes))
        else:
            self._forward(cmd)

    # --- upstream side ------------------------------------------------------------------------

    def feed_upstream(self, data: bytes) -> None:
        """Take bytes from beanstalkd; deliver replies in order, resume a held client."""
        if self.failed:
            return
        replies = self.replies
        replies.feed(data)
        pending = self.pending
        out = self.to_client
        was_held = self.blocked or self.waiting
        try:
            while True:
                reply = replies.next_reply()
                if reply is NEED_DATA:
                    break
                if not pending:
                    raise ProtocolError("reply from upstream with no command pending")
                line, body = reply
                entry = pending.popleft()
                kind = entry[0]
                if kind == K_PLAIN:
                    out += line
                    out += CRLF
                    if body is not None:
                        out += body
                elif kind == K_PUT:
                    self._on_put_reply(entry[1], line)
                elif kind == K_LOOKUP:
                    if self.shadow is None:
                        self._on_lookup(entry[1], entry[2], line, body)
                    else:
                        self.shadow.after_lookup(self, self._on_lookup, entry, line, body)
                else:
                    self._on_reply(entry, line, body)
                while pending and pending[0][0] == K_LOCAL:
                    out += pending.popleft()[1]
        except ProtocolError as exc:
            self.failed = f"upstream protocol error: {exc}"
            return
        if was_held and not self.blocked and not self.waiting and not self.draining:
            self._run()

    def _remember(self, job: int, tube: str) -> None:
        jobs = self.jobs
        if jobs is NO_ENTRIES:
            jobs = self.jobs = OrderedDict()
        if len(jobs) >= MAX_KNOWN_JOBS:
            jobs.popitem(last=False)  # O(1); ``del d[next(iter(d))]`` degrades on a dict
        jobs[job] = tube

    def _on_put_reply(self, tube: str, line: bytes) -> None:
        out = self.to_client
        out += line
        out += CRLF
        if line.startswith(b"INSERTED ") or line.startswith(b"BURIED "):
            self._remember(_reply_id(line), tube)

    def _on_reply(self, entry: Pending, line: bytes, body: bytes | None) -> None:
        kind = entry[0]
        if kind in (K_RESERVE, K_WAIT):
            if kind == K_WAIT:
                self.waiting = False
            if line.startswith(b"RESERVED "):
                job = _reply_id(line)
                tubes: tuple[str, ...] = entry[1]
                reserved = self.reserved
                if reserved is NO_ENTRIES:
                    reserved = self.reserved = OrderedDict()
                if len(reserved) >= MAX_RESERVED:
                    reserved.popitem(last=False)
                    self.forgot_reserved = True
                reserved[job] = tubes
                if len(tubes) == 1:
                    self._remember(job, tubes[0])
        elif kind == K_JOB_DONE:
            job = entry[1]
            self.reserved.pop(job, None)
            self.buried.pop(job, None)
            if line == b"DELETED":
                self.jobs.pop(job, None)
        elif kind == K_BURY:
            job = entry[1]
            candidates = self.reserved.pop(job, None)
            if line == b"BURIED" and candidates is not None:
                buried = self.buried
                if buried is NO_ENTRIES:
                    buried = self.buried = OrderedDict()
                if len(buried) >= MAX_OWN_BURIED:
                    buried.popitem(last=False)  # forgotten: deleting it needs manage
                buried[job] = candidates
        elif kind == K_TOUCH:
            if line == b"NOT_FOUND":
                self.reserved.pop(entry[1], None)
        elif kind == K_STATS_JOB and body is not None:
            tube, state = job_stats_fields(body)
            if state != "invalid":  # see _on_lookup: never cache a job still uploading
                self._remember(entry[1], tube)
            cmd: JobCmd = (OP_STATS_JOB, entry[1])
            d = self._decide("stats-job", "inspect", tube)
            if not d.allowed:
                # Answer in this reply's turn (not behind later pending entries).
                visible = self._visible(tube).allowed
                reply = self._replies[OP_STATS_JOB] if visible else NOT_FOUND
                self._audit(cmd, d, tube, entry[1], reply)
                self.to_client += reply
                return
        elif kind == K_LIST_TUBES and body is not None:
            self.to_client += self._filter_tubes(body)
            return
        elif kind == K_STATS and body is not None:
            self.to_client += ok_reply(_redact_stats(body[:-2]))
            return
        out = self.to_client
        out += line
        out += CRLF
        if body is not None:
            out += body

    def _on_lookup(self, cmd: JobIdCmd, verb: str, line: bytes, body: bytes | None) -> None:
        self.blocked = False
        if body is None:
            if line != b"NOT_FOUND":
                raise ProtocolError(f"unexpected reply to stats-job lookup: {line[:40]!r}")
            self.buried.pop(cmd[1], None)
            self._local(NOT_FOUND)
            return
        tube, state = job_stats_fields(body[:-2])
        if cmd[0] == OP_PEEK and state == "invalid":
            # The body is still uploading: beanstalkd would show uninitialised memory.
            self._local(NOT_FOUND)
            return
        if state != "invalid":
            # A job still uploading must not be remembered: a later ``peek`` of a known job
            # skips the lookup, and so would skip this check.
            self._remember(cmd[1], tube)
        job = cmd[1]
        if cmd[0] in (OP_RELEASE, OP_BURY, OP_TOUCH, OP_DELETE) and job in self.reserved:
            self.reserved[job] = (tube,)
        if cmd[0] in (OP_RELEASE, OP_BURY, OP_TOUCH) and state != "reserved":
            self._local(NOT_FOUND)  # beanstalkd's answer: only reserved jobs exist for these
            return
        if verb == MAYBE_OWN:
            if state == "buried" and job in self.buried:
                self.buried[job] = (tube,)
                verb = OWN
            elif state == "reserved":  # ours, or beanstalkd answers NOT_FOUND itself
                verb = OWN
            else:  # kicked since this connection buried it: no longer its job
                self.buried.pop(job, None)
        self._decide_job(cmd, verb, tube)

    def _filter_tubes(self, body: bytes) -> bytes:
        """The ``list-tubes`` reply with only the tubes this principal may see: one compiled
        regex pass over the whole body (names are matched in C, no per-name Python work);
        a body that is not a plain list of ``- name`` lines is judged line by line."""
        visible = self._fresh_policy().visible_tubes(self.principal)
        yaml = body[:-2]
        if visible.nothing:
            keep: list[bytes] = []
        elif _plain_tube_list(yaml):
            keep = visible.lines.findall(yaml)  # the names, without their "- "
        else:
            match = visible.match
            keep = [
                raw[2:]
                for raw in yaml.split(b"\n")
                if raw.startswith(b"- ")
                and match(_yaml_scalar(raw[2:]).decode("ascii", "replace"))
            ]
        return ok_reply(b"---\n- " + b"\n- ".join(keep) + b"\n" if keep else b"---\n")


#: Bytes of a plain ``list-tubes`` body: tube-name characters, newlines and the space of
#: each ``- name`` line.
_TUBE_LIST_BYTES: Final = "".join(sorted(TUBE_CHARS)).encode("ascii") + b"\n "


def _plain_tube_list(yaml: bytes) -> bool:
    """True when every space in ``yaml`` is the one of a ``\\n- name`` line and every other
    byte is a tube-name character or a newline: then each ``- `` line's name is its exact
    rest, with nothing for ``_yaml_scalar`` to strip or unquote."""
    return not yaml.translate(None, _TUBE_LIST_BYTES) and yaml.count(b" ") == yaml.count(
        b"\n- "
    )


#: Each op's handler takes the session and that op's command type
#: (``handlers[cmd[0]](self, cmd)``): plain functions, one tuple for every session (a tuple
#: of bound methods per session held 1.9 KiB).
Session._handlers = tuple([getattr(Session, name) for name in _HANDLER_NAMES])


def _reply_id(line: bytes) -> int:
    parts = line.split(b" ")
    if len(parts) < 2 or not parts[1].isdigit():
        raise ProtocolError(f"malformed reply from upstream: {line[:40]!r}")
    return int(parts[1])


def _redact_stats(yaml: bytes) -> bytes:
    """``stats`` for a principal without the server class: the same keys (client libraries
    read them), real values only for ``TENANT_SAFE_STATS``; host names are "redacted" and
    every counter (jobs, commands, connections, tubes, resource usage, pid) reads 0, so one
    tenant learns nothing about another's work."""
    lines = []
    for raw in yaml.split(b"\n"):
        key, sep, _ = raw.partition(b":")
        if sep and key not in TENANT_SAFE_STATS:
            raw = key + (b": redacted" if key in REDACTED_STATS else b": 0")
        lines.append(raw)
    return b"\n".join(lines)
