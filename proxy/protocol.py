"""beanstalkd 1.12 wire protocol, both directions, as a pure (sans-I/O) module.

``ClientParser`` frames the bytes a client sends exactly as strictly as the proxy can afford
to: only ``\\r\\n`` ends a line, a line holds at most 224 bytes including its ``\\r\\n``, and a
stray ``\\r``, a bare ``\\n`` or a NUL inside a line, a malformed ``put`` line or a command name
that beanstalkd would match by prefix raises ``ProtocolError`` (the session answers
``BAD_FORMAT`` and closes). Well-framed but wrong lines become ``OP_ERROR`` commands carrying
the reply beanstalkd itself would give (``UNKNOWN_COMMAND``, ``BAD_FORMAT``, ``EXPECTED_CRLF``,
``JOB_TOO_BIG``), and the connection carries on. Every accepted command is a small tuple whose
first element is its ``Op`` (typed per op: ``Command`` is a union that ``cmd[0] is OP_X``
narrows); ``write_command`` serializes it back to canonical bytes, which are the only bytes the
relay ever forwards. ``ReplyParser`` frames upstream replies: single lines, or
``RESERVED``/``FOUND``/``OK`` headers followed by a body read by count, so a body that does
not end in ``\\r\\n`` cannot desynchronise the proxy. Nothing here imports
asyncio, socket or ssl; see ``docs/protocol.md`` for the traps it encodes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final, Literal

from proxy.errors import ProtocolError

#: beanstalkd's LINE_BUF_SIZE: the longest command line, ``\r\n`` included.
MAX_LINE: Final = 224
#: The longest line content (without ``\r\n``).
MAX_LINE_CONTENT: Final = MAX_LINE - 2
#: beanstalkd's MAX_TUBE_NAME_LEN - 1.
MAX_TUBE_NAME: Final = 200
U32_MAX: Final = 0xFFFFFFFF
U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
#: ``reserve-with-timeout`` is parsed into a C int by 1.12; larger values wrap or mean "forever".
RWT_MAX: Final = 0x7FFFFFFF
#: beanstalkd's own cap on ``-z``.
MAX_JOB_SIZE_CAP: Final = 1073741824
#: Upstream reply lines are short (the longest is ``USING <200 chars>``); anything longer is a
#: broken or hostile upstream.
MAX_REPLY_LINE: Final = 1024

CRLF: Final = b"\r\n"


class Op(IntEnum):
    """Operation codes of commands; the value is also the index into ``NAMES`` and the
    session's per-op tables."""

    PUT = 0
    USE = 1
    RESERVE = 2
    RESERVE_WITH_TIMEOUT = 3
    RESERVE_JOB = 4
    DELETE = 5
    RELEASE = 6
    BURY = 7
    TOUCH = 8
    WATCH = 9
    IGNORE = 10
    PEEK = 11
    PEEK_READY = 12
    PEEK_DELAYED = 13
    PEEK_BURIED = 14
    KICK = 15
    KICK_JOB = 16
    STATS_JOB = 17
    STATS_TUBE = 18
    STATS = 19
    LIST_TUBES = 20
    LIST_TUBE_USED = 21
    LIST_TUBES_WATCHED = 22
    PAUSE_TUBE = 23
    QUIT = 24
    ERROR = 25  # not a beanstalkd command: a reply the proxy gives itself


# Module-level names of the ops (the session and the tests use these).
OP_PUT: Final = Op.PUT
OP_USE: Final = Op.USE
OP_RESERVE: Final = Op.RESERVE
OP_RESERVE_WITH_TIMEOUT: Final = Op.RESERVE_WITH_TIMEOUT
OP_RESERVE_JOB: Final = Op.RESERVE_JOB
OP_DELETE: Final = Op.DELETE
OP_RELEASE: Final = Op.RELEASE
OP_BURY: Final = Op.BURY
OP_TOUCH: Final = Op.TOUCH
OP_WATCH: Final = Op.WATCH
OP_IGNORE: Final = Op.IGNORE
OP_PEEK: Final = Op.PEEK
OP_PEEK_READY: Final = Op.PEEK_READY
OP_PEEK_DELAYED: Final = Op.PEEK_DELAYED
OP_PEEK_BURIED: Final = Op.PEEK_BURIED
OP_KICK: Final = Op.KICK
OP_KICK_JOB: Final = Op.KICK_JOB
OP_STATS_JOB: Final = Op.STATS_JOB
OP_STATS_TUBE: Final = Op.STATS_TUBE
OP_STATS: Final = Op.STATS
OP_LIST_TUBES: Final = Op.LIST_TUBES
OP_LIST_TUBE_USED: Final = Op.LIST_TUBE_USED
OP_LIST_TUBES_WATCHED: Final = Op.LIST_TUBES_WATCHED
OP_PAUSE_TUBE: Final = Op.PAUSE_TUBE
OP_QUIT: Final = Op.QUIT
OP_ERROR: Final = Op.ERROR

#: Command names indexed by op code (``OP_ERROR`` has the pseudo-name ``error``).
NAMES: Final[tuple[str, ...]] = (
    "put",
    "use",
    "reserve",
    "reserve-with-timeout",
    "reserve-job",
    "delete",
    "release",
    "bury",
    "touch",
    "watch",
    "ignore",
    "peek",
    "peek-ready",
    "peek-delayed",
    "peek-buried",
    "kick",
    "kick-job",
    "stats-job",
    "stats-tube",
    "stats",
    "list-tubes",
    "list-tube-used",
    "list-tubes-watched",
    "pause-tube",
    "quit",
    "error",
)

#: Command ops whose single argument is a job id.
JOB_ID_OPS: Final = frozenset(
    {OP_RESERVE_JOB, OP_DELETE, OP_RELEASE, OP_BURY, OP_TOUCH, OP_PEEK, OP_KICK_JOB, OP_STATS_JOB}
)

BAD_FORMAT: Final = b"BAD_FORMAT\r\n"
UNKNOWN_COMMAND: Final = b"UNKNOWN_COMMAND\r\n"
EXPECTED_CRLF: Final = b"EXPECTED_CRLF\r\n"
JOB_TOO_BIG: Final = b"JOB_TOO_BIG\r\n"
NOT_FOUND: Final = b"NOT_FOUND\r\n"
NOT_PERMITTED: Final = b"NOT_PERMITTED\r\n"
OUT_OF_MEMORY: Final = b"OUT_OF_MEMORY\r\n"
RATE_LIMITED: Final = b"RATE_LIMITED\r\n"  # the proxy's own reply; beanstalkd never sends it

# Commands are tuples whose first item is their ``Op`` (a tagged union: ``if cmd[0] is OP_PUT``
# narrows ``cmd`` to ``PutCmd`` under mypy). Plain tuples, not NamedTuples: the parser builds
# one per command and a tuple display is the cheapest object Python makes.
NoArgOp = Literal[
    Op.RESERVE,
    Op.PEEK_READY,
    Op.PEEK_DELAYED,
    Op.PEEK_BURIED,
    Op.STATS,
    Op.LIST_TUBES,
    Op.LIST_TUBE_USED,
    Op.LIST_TUBES_WATCHED,
    Op.QUIT,
]
#: Ops whose whole argument is a tube name.
TubeOp = Literal[Op.USE, Op.WATCH, Op.IGNORE, Op.STATS_TUBE]
#: Ops whose whole argument is a job id.
JobOp = Literal[Op.RESERVE_JOB, Op.DELETE, Op.TOUCH, Op.PEEK, Op.KICK_JOB, Op.STATS_JOB]
#: ``(OP_PUT, pri, delay, ttr, body)``; ``body`` is ``None`` for a put refused from its command
#: line (``ClientParser.on_put``), whose body was discarded.
PutCmd = tuple[Literal[Op.PUT], int, int, int, bytes | None]
#: ``(OP_PUT, pri, delay, ttr, nbytes)``: a put command line, before its body (``parse_line``).
PutLine = tuple[Literal[Op.PUT], int, int, int, int]
#: ``(OP_<no-argument op>,)``
NoArgCmd = tuple[NoArgOp]
#: ``(OP_USE|WATCH|IGNORE|STATS_TUBE, tube)``
TubeCmd = tuple[TubeOp, str]
#: ``(OP_<job-id op>, id)``
JobCmd = tuple[JobOp, int]
#: ``(OP_RELEASE, id, pri, delay)``
ReleaseCmd = tuple[Literal[Op.RELEASE], int, int, int]
#: ``(OP_BURY, id, pri)``
BuryCmd = tuple[Literal[Op.BURY], int, int]
#: ``(OP_KICK, bound)``
KickCmd = tuple[Literal[Op.KICK], int]
#: ``(OP_RESERVE_WITH_TIMEOUT, seconds)``
RwtCmd = tuple[Literal[Op.RESERVE_WITH_TIMEOUT], int]
#: ``reserve`` or ``reserve-with-timeout``
ReserveCmd = tuple[Literal[Op.RESERVE]] | RwtCmd
#: ``(OP_PAUSE_TUBE, tube, delay)``
PauseCmd = tuple[Literal[Op.PAUSE_TUBE], str, int]
#: ``(OP_ERROR, reply)``: a well-framed line the proxy answers itself, with beanstalkd's reply.
ErrorCmd = tuple[Literal[Op.ERROR], bytes]
#: Commands whose first argument is a job id (the ops of ``JOB_ID_OPS``).
JobIdCmd = JobCmd | ReleaseCmd | BuryCmd
#: Every command but ``put``.
OtherCmd = NoArgCmd | TubeCmd | JobIdCmd | KickCmd | RwtCmd | PauseCmd | ErrorCmd
#: A command as ``ClientParser`` returns it and ``write_command`` serializes it.
Command = PutCmd | OtherCmd
#: A command line as ``parse_line`` returns it (a put with its body length).
LineCommand = PutLine | OtherCmd
_ArgParser = Callable[[bytes], "OtherCmd | None"]


class NeedData(Enum):
    """The type of ``NEED_DATA``: the parser needs more bytes before it can return anything.
    One member, so ``if x is NEED_DATA`` narrows ``x`` under mypy."""

    NEED_DATA = 0

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

# --- client side: argument grammars -------------------------------------------------------
# Digits only (never int() on raw input: it accepts '+5', ' 5', '1_0' and Unicode digits).
# beanstalkd's read_u32/read_u64 skip any number of spaces (only spaces) before a number.
_NAME_CLASS = rb"A-Za-z0-9\-+/;.$_()"
_TUBE_RE: Final = re.compile(rb"[A-Za-z0-9+/;.$_()][" + _NAME_CLASS + rb"]{0,199}")
_PUT_RE: Final = re.compile(rb"put +([0-9]+) +([0-9]+) +([0-9]+) +([0-9]+)")
_ONE_NUM_RE: Final = re.compile(rb" *([0-9]+)")
_TWO_NUM_RE: Final = re.compile(rb" *([0-9]+) +([0-9]+)")
_THREE_NUM_RE: Final = re.compile(rb" *([0-9]+) +([0-9]+) +([0-9]+)")
_PAUSE_RE: Final = re.compile(rb" *([A-Za-z0-9+/;.$_()][" + _NAME_CLASS + rb"]*) +([0-9]+)")

#: beanstalkd's which_cmd prefixes, in its order. Used only to pick the error a line that the
#: proxy did not accept would have got from beanstalkd (BAD_FORMAT vs UNKNOWN_COMMAND).
_SERVER_PREFIXES: Final = (
    b"put ",
    b"peek ",
    b"peek-ready",
    b"peek-delayed",
    b"peek-buried",
    b"reserve-with-timeout ",
    b"reserve-job ",
    b"reserve",
    b"delete ",
    b"release ",
    b"bury ",
    b"kick ",
    b"kick-job ",
    b"touch ",
    b"stats-job ",
    b"stats-tube ",
    b"stats",
    b"use ",
    b"watch ",
    b"ignore ",
    b"list-tubes-watched",
    b"list-tube-used",
    b"list-tubes",
    b"quit",
    b"pause-tube",
)

_NOARG: Final[dict[bytes, NoArgCmd]] = {
    b"reserve": (OP_RESERVE,),
    b"peek-ready": (OP_PEEK_READY,),
    b"peek-delayed": (OP_PEEK_DELAYED,),
    b"peek-buried": (OP_PEEK_BURIED,),
    b"stats": (OP_STATS,),
    b"list-tubes": (OP_LIST_TUBES,),
    b"list-tube-used": (OP_LIST_TUBE_USED,),
    b"list-tubes-watched": (OP_LIST_TUBES_WATCHED,),
    b"quit": (OP_QUIT,),
}

_ERR_BAD_FORMAT: Final[ErrorCmd] = (OP_ERROR, BAD_FORMAT)
_ERR_UNKNOWN: Final[ErrorCmd] = (OP_ERROR, UNKNOWN_COMMAND)
_ERR_EXPECTED_CRLF: Final[ErrorCmd] = (OP_ERROR, EXPECTED_CRLF)
_ERR_JOB_TOO_BIG: Final[ErrorCmd] = (OP_ERROR, JOB_TOO_BIG)


def _tube(rest: bytes) -> str | None:
    """A whole-rest-of-line tube name, as ``use``/``watch``/``ignore``/``stats-tube`` take it."""
    if _TUBE_RE.fullmatch(rest) is None:
        return None
    return rest.decode("ascii")


def _parse_tube_cmd(op: TubeOp) -> _ArgParser:
    def parse(rest: bytes) -> TubeCmd | None:
        name = _tube(rest)
        return None if name is None else (op, name)

    return parse


def _parse_id_cmd(op: JobOp) -> _ArgParser:
    def parse(rest: bytes) -> JobCmd | None:
        m = _ONE_NUM_RE.fullmatch(rest)
        if m is None:
            return None
        job_id = int(m[1])
        return None if job_id > U64_MAX else (op, job_id)

    return parse


def _parse_release(rest: bytes) -> ReleaseCmd | None:
    m = _THREE_NUM_RE.fullmatch(rest)
    if m is None:
        return None
    job_id, pri, delay = int(m[1]), int(m[2]), int(m[3])
    if job_id > U64_MAX or pri > U32_MAX or delay > U32_MAX:
        return None
    return (OP_RELEASE, job_id, pri, delay)


def _parse_bury(rest: bytes) -> BuryCmd | None:
    m = _TWO_NUM_RE.fullmatch(rest)
    if m is None:
        return None
    job_id, pri = int(m[1]), int(m[2])
    if job_id > U64_MAX or pri > U32_MAX:
        return None
    return (OP_BURY, job_id, pri)


def _parse_kick(rest: bytes) -> KickCmd | None:
    # beanstalkd parses with strtoul: signs, tabs, 0x and trailing junk are all accepted and
    # wrap silently. The proxy accepts plain digits in u32 range only.
    m = _ONE_NUM_RE.fullmatch(rest)
    if m is None:
        return None
    bound = int(m[1])
    return None if bound > U32_MAX else (OP_KICK, bound)


def _parse_rwt(rest: bytes) -> RwtCmd | None:
    # beanstalkd 1.12 parses with strtol into an int: "abc" is 0, "-1" waits forever, trailing
    # junk is ignored. The proxy accepts plain digits up to INT_MAX only.
    m = _ONE_NUM_RE.fullmatch(rest)
    if m is None:
        return None
    secs = int(m[1])
    return None if secs > RWT_MAX else (OP_RESERVE_WITH_TIMEOUT, secs)


def _parse_pause(rest: bytes) -> PauseCmd | None:
    m = _PAUSE_RE.fullmatch(rest)
    if m is None:
        return None
    name, delay = m[1], int(m[2])
    if len(name) > MAX_TUBE_NAME or delay > U32_MAX:
        return None
    return (OP_PAUSE_TUBE, name.decode("ascii"), delay)


_ARG: Final[dict[bytes, _ArgParser]] = {
    b"use": _parse_tube_cmd(OP_USE),
    b"watch": _parse_tube_cmd(OP_WATCH),
    b"ignore": _parse_tube_cmd(OP_IGNORE),
    b"stats-tube": _parse_tube_cmd(OP_STATS_TUBE),
    b"peek": _parse_id_cmd(OP_PEEK),
    b"reserve-job": _parse_id_cmd(OP_RESERVE_JOB),
    b"delete": _parse_id_cmd(OP_DELETE),
    b"touch": _parse_id_cmd(OP_TOUCH),
    b"kick-job": _parse_id_cmd(OP_KICK_JOB),
    b"stats-job": _parse_id_cmd(OP_STATS_JOB),
    b"release": _parse_release,
    b"bury": _parse_bury,
    b"kick": _parse_kick,
    b"reserve-with-timeout": _parse_rwt,
    b"pause-tube": _parse_pause,
}


def _refuse_or_error(line: bytes) -> ErrorCmd:
    """The reply for a well-framed line the proxy does not accept as a command.

    Lines beanstalkd would *execute* under a prefix match (``quitX``, ``pause-tubeX``) are
    smuggling attempts and raise; so does any ``put``-like line, because its body would follow.
    Other lines get the error beanstalkd itself would give.
    """
    if line.startswith(b"put"):
        raise ProtocolError("malformed put command line")
    if line.startswith(b"quit"):
        raise ProtocolError("command name matched only by prefix ('quit...')")
    if line.startswith(b"pause-tube") and len(line) > 10 and line[10] != 0x20:
        raise ProtocolError("command name matched only by prefix ('pause-tube...')")
    if line.startswith(_SERVER_PREFIXES):
        return _ERR_BAD_FORMAT
    return _ERR_UNKNOWN


def parse_line(line: bytes) -> LineCommand:
    """Parse one command line (without its ``\\r\\n``) that contains no CR, LF or NUL.

    Returns a command tuple; for ``put`` a ``PutLine``, whose last item is the body *length*
    (the caller reads the body). Raises ``ProtocolError`` for lines that must close the connection.
    """
    cmd = _NOARG.get(line)
    if cmd is not None:
        return cmd
    if line.startswith(b"put "):
        m = _PUT_RE.fullmatch(line)
        if m is None:
            raise ProtocolError("malformed put command line")
        pri, delay, ttr, nbytes = int(m[1]), int(m[2]), int(m[3]), int(m[4])
        if pri > U32_MAX or delay > U32_MAX or ttr > U32_MAX or nbytes > U32_MAX:
            raise ProtocolError("put argument out of range")
        return (OP_PUT, pri, delay, ttr, nbytes)
    name, sep, rest = line.partition(b" ")
    if sep:
        parser = _ARG.get(name)
        if parser is not None:
            parsed = parser(rest)
            return _ERR_BAD_FORMAT if parsed is None else parsed
    return _refuse_or_error(line)


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """A command line as ``explain`` shows it: name, verb-relevant tube and job id."""

    op: Op
    name: str
    tube: str | None
    job_id: int | None
    command: LineCommand


def parse_command_line(line: bytes) -> ParsedLine:
    """Parse a single command line for offline tools (``explain``); ``\\r\\n`` optional.

    Raises ``ProtocolError`` for anything the relay would refuse and close on, and
    ``ValueError`` for lines the relay would answer with an error reply.
    """
    if line.endswith(CRLF):
        line = line[:-2]
    if len(line) > MAX_LINE_CONTENT:
        raise ProtocolError("line longer than 224 bytes")
    for bad, what in ((b"\r", "stray CR"), (b"\n", "bare LF"), (b"\0", "NUL byte")):
        if bad in line:
            raise ProtocolError(f"{what} in command line")
    cmd = parse_line(line)
    if cmd[0] is OP_ERROR:
        raise ValueError(f"beanstalkd would answer {cmd[1].decode().strip()}")
    op = cmd[0]
    arg = cmd[1] if len(cmd) > 1 else None
    names_tube = op in (OP_USE, OP_WATCH, OP_IGNORE, OP_STATS_TUBE, OP_PAUSE_TUBE)
    return ParsedLine(
        op=op,
        name=NAMES[op],
        tube=arg if names_tube and isinstance(arg, str) else None,
        job_id=arg if op in JOB_ID_OPS and isinstance(arg, int) else None,
        command=cmd,
    )


class Framing(Enum):
    """What ``ClientParser`` reads next."""

    LINE = 0  # a command line
    BODY = 1  # the body of the put whose header is ``_put``, and its CRLF
    SKIP_TOO_BIG = 2  # ``n + 2`` bytes of a put over max-job-size are dropped, then JOB_TOO_BIG
    SKIP_DENIED = 3  # the ``n`` body bytes of a put ``on_put`` refused are dropped, then its CRLF
    HELD = 4  # the put whose header is ``_put`` waits for ``admit`` before its body is read


_LINE: Final = Framing.LINE
_BODY: Final = Framing.BODY
_SKIP_TOO_BIG: Final = Framing.SKIP_TOO_BIG
_SKIP_DENIED: Final = Framing.SKIP_DENIED
_HELD: Final = Framing.HELD


class ClientParser:
    """Frames and parses client bytes into commands, pure and incremental.

    Feed bytes with ``feed``; call ``next_command`` until it returns ``NEED_DATA``. ``put``
    commands are returned only once their whole body has arrived, as
    ``(OP_PUT, pri, delay, ttr, body)``. A ``put`` over ``max_job_size`` has exactly
    ``n + 2`` bytes skipped (never buffered) and then yields a ``JOB_TOO_BIG`` error command,
    as beanstalkd does. ``ProtocolError`` is sticky: after it the parser refuses all input.

    ``on_put`` (optional) is asked about every ``put`` header within ``max_job_size`` before
    its body is buffered: when it returns false, the ``n`` body bytes are discarded as they
    arrive (never held) and, once the trailing CRLF is there, the put is returned as
    ``(OP_PUT, pri, delay, ttr, None)`` (``EXPECTED_CRLF`` as usual when it is not a CRLF).
    When it returns ``None`` the put is allowed but must wait (the proxy-wide budget of bodies
    in flight is full): ``next_command`` returns ``NEED_DATA`` without reading its body, bytes
    fed meanwhile are kept, and ``admit`` lets the body be read.
    """

    __slots__ = ("_buf", "_failed", "_framing", "_pos", "_put", "_skip", "max_job_size", "on_put")

    def __init__(self, max_job_size: int = 65535) -> None:
        if not 0 <= max_job_size <= MAX_JOB_SIZE_CAP:
            raise ValueError("max_job_size out of range")
        self.max_job_size = max_job_size
        self._buf = bytearray()
        self._pos = 0
        self._framing = _LINE
        # (pri, delay, ttr, nbytes) of the put whose body is read (BODY) or dropped (SKIP_DENIED)
        self._put = (0, 0, 0, 0)
        self._skip = 0  # bytes of an oversized put body still to discard
        self._failed: ProtocolError | None = None
        self.on_put: Callable[[int, int, int, int], bool | None] | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as commands."""
        return len(self._buf) - self._pos

    @property
    def held(self) -> bool:
        """A put header was accepted with ``on_put`` returning ``None``: its body waits."""
        return self._framing is _HELD

    def admit(self) -> None:
        """Let the held put's body be read (see ``on_put``)."""
        if self._framing is _HELD:
            self._framing = _BODY

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def next_command(self) -> Command | NeedData:
        """Return the next complete command, ``NEED_DATA``, or raise ``ProtocolError``."""
        if self._failed is not None:
            raise self._failed
        pos = self._pos
        if pos == len(self._buf) and self._framing is _LINE:  # nothing buffered: the common end
            if pos:
                self._buf.clear()
                self._pos = 0
            return NEED_DATA
        try:
            while True:
                cmd = self._step()
                if cmd is not None:
                    return cmd
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _step(self) -> Command | NeedData | None:
        """The next command, ``NEED_DATA``, or ``None`` to be called again (a body was
        discarded at once)."""
        buf = self._buf
        pos = self._pos
        framing = self._framing
        if framing is not _LINE:
            if self._skip or framing is _HELD:
                return NEED_DATA
            if framing is _SKIP_DENIED:  # a refused body has been skipped
                if len(buf) - pos < 2:
                    self._compact()
                    return NEED_DATA
                pri, delay, ttr, _ = self._put
                self._framing = _LINE
                self._pos = pos + 2
                if buf[pos] != 0x0D or buf[pos + 1] != 0x0A:
                    return _ERR_EXPECTED_CRLF
                return (OP_PUT, pri, delay, ttr, None)
            if framing is _SKIP_TOO_BIG:  # an oversized body has been skipped
                self._framing = _LINE
                return _ERR_JOB_TOO_BIG
            return self._body()
        end = len(buf)
        cr = buf.find(b"\r", pos, pos + MAX_LINE_CONTENT + 1)  # (find stops at the end anyway)
        if cr < 0:
            if end - pos > MAX_LINE_CONTENT:
                raise ProtocolError("line longer than 224 bytes")
            if buf.find(b"\n", pos) >= 0:
                raise ProtocolError("bare LF in command line")
            self._compact()
            return NEED_DATA
        if cr + 1 >= end:
            # A LF before the first CR is a bare LF whatever follows; detect it now, as the
            # no-CR branch above does, so the result never depends on how bytes were chunked.
            if buf.find(b"\n", pos, cr) >= 0:
                raise ProtocolError("bare LF in command line")
            self._compact()
            return NEED_DATA
        if buf[cr + 1] != 0x0A:
            raise ProtocolError("stray CR in command line")
        line = bytes(buf[pos:cr])
        self._pos = cr + 2
        # int membership: ``b"\n" in line`` first tries the needle as an int in CPython 3.11,
        # building and discarding a TypeError each time (~1,800 instructions per command)
        if 0x0A in line:
            raise ProtocolError("bare LF in command line")
        if 0 in line:
            raise ProtocolError("NUL byte in command line")
        cmd = parse_line(line)
        if cmd[0] is not OP_PUT:
            return cmd
        _, pri, delay, ttr, nbytes = cmd
        if nbytes > self.max_job_size:
            # Discard exactly n + 2 bytes, then answer JOB_TOO_BIG (beanstalkd does the same).
            return self._discard(nbytes + 2, _SKIP_TOO_BIG)
        self._put = (pri, delay, ttr, nbytes)
        on_put = self.on_put
        if on_put is not None:
            verdict = on_put(pri, delay, ttr, nbytes)
            if verdict is False:
                return self._discard(nbytes, _SKIP_DENIED)
            if verdict is None:
                self._framing = _HELD
                self._compact()
                return NEED_DATA
        self._framing = _BODY
        return self._body()

    def _discard(self, need: int, framing: Framing) -> Command | NeedData | None:
        """Drop ``need`` bytes as they arrive, then go on as ``framing`` says. ``None``: done
        at once, parse on."""
        buf = self._buf
        have = len(buf) - self._pos
        self._framing = framing
        if have >= need:
            self._pos += need
            return None
        del buf[:]
        self._pos = 0
        self._skip = need - have
        return NEED_DATA

    def _body(self) -> Command | NeedData:
        put = self._put
        nbytes = put[3]
        buf = self._buf
        start = self._pos
        if len(buf) - start < nbytes + 2:
            self._compact()
            return NEED_DATA
        stop = start + nbytes
        self._framing = _LINE
        self._pos = stop + 2
        if buf[stop] != 0x0D or buf[stop + 1] != 0x0A:
            return _ERR_EXPECTED_CRLF
        return (OP_PUT, put[0], put[1], put[2], bytes(buf[start:stop]))


# --- canonical serialization ---------------------------------------------------------------

_NOARG_BYTES: Final[dict[Op, bytes]] = {
    OP_RESERVE: b"reserve\r\n",
    OP_PEEK_READY: b"peek-ready\r\n",
    OP_PEEK_DELAYED: b"peek-delayed\r\n",
    OP_PEEK_BURIED: b"peek-buried\r\n",
    OP_STATS: b"stats\r\n",
    OP_LIST_TUBES: b"list-tubes\r\n",
    OP_LIST_TUBE_USED: b"list-tube-used\r\n",
    OP_LIST_TUBES_WATCHED: b"list-tubes-watched\r\n",
    OP_QUIT: b"quit\r\n",
}
_ONE_INT_FMT: Final[dict[Op, bytes]] = {
    op: NAMES[op].encode() + b" %d\r\n"
    for op in (
        OP_PEEK,
        OP_RESERVE_JOB,
        OP_DELETE,
        OP_TOUCH,
        OP_KICK_JOB,
        OP_STATS_JOB,
        OP_KICK,
        OP_RESERVE_WITH_TIMEOUT,
    )
}
_TUBE_PREFIX: Final[dict[Op, bytes]] = {
    op: NAMES[op].encode() + b" " for op in (OP_USE, OP_WATCH, OP_IGNORE, OP_STATS_TUBE)
}


def write_command(out: bytearray, cmd: Command) -> None:
    """Append the canonical serialization of ``cmd`` to ``out``."""
    if cmd[0] is OP_PUT:
        body = cmd[4]
        assert body is not None
        out += b"put %d %d %d %d\r\n" % (cmd[1], cmd[2], cmd[3], len(body))
        out += body
        out += CRLF
        return
    op = cmd[0]
    fixed = _NOARG_BYTES.get(op)
    if fixed is not None:
        out += fixed
        return
    if len(cmd) == 2:  # a job id, a number or a tube name (or an OP_ERROR reply)
        arg = cmd[1]
        fmt = _ONE_INT_FMT.get(op)
        if fmt is not None:
            out += fmt % arg
            return
        prefix = _TUBE_PREFIX.get(op)
        if prefix is not None and isinstance(arg, str):
            out += prefix
            out += arg.encode("ascii")
            out += CRLF
            return
    elif cmd[0] is OP_RELEASE:
        out += b"release %d %d %d\r\n" % (cmd[1], cmd[2], cmd[3])
        return
    elif cmd[0] is OP_BURY:
        out += b"bury %d %d\r\n" % (cmd[1], cmd[2])
        return
    elif cmd[0] is OP_PAUSE_TUBE:
        out += b"pause-tube %s %d\r\n" % (cmd[1].encode("ascii"), cmd[2])
        return
    raise ValueError(f"cannot serialize {cmd!r}")


def serialize(cmd: Command) -> bytes:
    """The canonical bytes of ``cmd`` (convenience wrapper of ``write_command``)."""
    out = bytearray()
    write_command(out, cmd)
    return bytes(out)


# --- upstream side ---------------------------------------------------------------------------

_BODY_HEADERS: Final = (b"RESERVED ", b"FOUND ", b"OK ")
_RESERVED_RE: Final = re.compile(rb"(?:RESERVED|FOUND) ([0-9]{1,20}) ([0-9]{1,10})")
_OK_RE: Final = re.compile(rb"OK ([0-9]{1,10})")


def body_length(line: bytes) -> int:
    """For a reply line that announces a body, the body length (without its trailer).

    Returns -1 for single-line replies; raises ``ProtocolError`` on a malformed header.
    """
    if not line.startswith(_BODY_HEADERS):
        return -1
    m = _OK_RE.fullmatch(line) if line[0] == 0x4F else _RESERVED_RE.fullmatch(line)
    if m is None:
        raise ProtocolError(f"malformed reply header from upstream: {line[:40]!r}")
    return int(m[m.lastindex or 1])


class ReplyParser:
    """Frames upstream replies: ``(line, body)`` where ``body`` is ``None`` for one-line
    replies and otherwise the ``n + 2`` raw bytes that follow the header, read by count."""

    __slots__ = ("_buf", "_line", "_need", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._line: bytes | None = None
        self._need = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_reply(self) -> tuple[bytes, bytes | None] | NeedData:
        """Return the next complete reply or ``NEED_DATA``; raise ``ProtocolError``."""
        buf = self._buf
        pos = self._pos
        if self._line is None:
            if pos == len(buf):  # nothing buffered: the common end of a read
                if pos:
                    buf.clear()
                    self._pos = 0
                return NEED_DATA
            end = buf.find(b"\r\n", pos, pos + MAX_REPLY_LINE)
            if end < 0:
                if len(buf) - pos >= MAX_REPLY_LINE:
                    raise ProtocolError("reply line from upstream too long")
                self._compact()
                return NEED_DATA
            line = bytes(buf[pos:end])
            pos = end + 2
            n = body_length(line)
            if n < 0:
                self._pos = pos
                return (line, None)
            self._line = line
            self._need = n + 2
            self._pos = pos
        if len(buf) - pos < self._need:
            self._compact()
            return NEED_DATA
        line = self._line
        body = bytes(buf[pos : pos + self._need])
        self._pos = pos + self._need
        self._line = None
        return (line, body)

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
