"""Every message that crosses the parent/worker boundary.

Parent -> worker (on the worker's request queue):
    Synthesize(request)   run this request (the worker may batch it)
    Cancel(request_id)    stop this request at the next step, free its slot
    HandBack(request_id)  give this row back at the next step (Preempted): it moves
    Shutdown()            exit at the next step: the parent holds none of your requests
    (inside a Request's voices: KeptVoice(key, samples) to use and keep,
     VoiceRef(key) for one kept before; see VoiceSender and VoiceCache)

Worker -> parent (on the worker's response pipe):
    Ready(...)            the engine is loaded; the slot may take work
    BootFailed(...)       the engine could not load; the worker exits (its traceback
                          comes along, for the parent's log)
    Started(id)           the request entered a generation batch (a resumed row: at
                          from_samples, the audio its history covers)
    Chunk(id, seq, pcm)   a piece of audio (float32 mono numpy array), with the row's
                          history since the last chunk (HistoryDelta)
    Done(id, ...)         the request finished; its audio is the chunks sent, and
                          stop_reason says why it stopped (StopReason)
    Failed(id, ...)       the request failed with a typed ErrorKind; an unexpected
                          exception's traceback comes along for the parent's log
                          (never for a client)
    Preempted(id, steps)  a batch row gave its place to an interactive request, or
                          a row was handed back (HandBack); the parent sends it again
                          with its history, to resume

All messages are frozen dataclasses, told apart by their type; nothing else crosses.
Errors are typed by ErrorKind, never classified by matching strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from workers.wire.history import History, HistoryDelta

SAMPLE_RATE = 24_000
# Guidance scales a request may ask for: the API validates against these, and an
# engine refuses anything else (a request built in-process skips the API).
MIN_CFG_SCALE, MAX_CFG_SCALE = 1.0, 2.0
MAX_INFERENCE_STEPS = 100  # diffusion steps a request may ask for (and the default at most)
MAX_VOICE_S = 120.0  # the longest voice sample an engine takes (bounds max_voice_s)


class ErrorKind(str, enum.Enum):
    """Typed failure kinds. Their values are what the API reports."""

    BAD_INPUT = "bad_input"
    OUT_OF_MEMORY = "out_of_memory"
    ENGINE_ERROR = "engine_error"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"


class StopReason(str, enum.Enum):
    """Why a row that finished stopped. Done carries the value; the API reports it."""

    EOS = "eos"  # the model ended the speech itself
    RUNAWAY_CAP = "runaway_cap"  # cut at runaway_factor x the estimated length
    MAX_AUDIO = "max_audio"  # cut at the request's max_audio_s
    CONTEXT = "context"  # cut where the model's context was full
    ESTIMATE = "estimate"  # the tiny model (random weights) ends at the estimated length


class Priority(str, enum.Enum):
    """A request's class: an interactive one that waits takes a batch row's place."""

    INTERACTIVE = "interactive"  # the page, /v1/synthesize, /v1/audio/speech
    BATCH = "batch"  # jobs


class PoolError(Exception):
    """An error with a kind a client can act on. Raised on both sides."""

    def __init__(self, kind: ErrorKind, message: str, retryable: bool = False):
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        self.retryable = retryable
        self.traceback = ""  # where an unexpected exception became this error (for the log)

    def __repr__(self) -> str:
        return f"PoolError({self.kind.value}: {self.message})"


def unexpected(err: BaseException) -> PoolError:
    """An engine's unexpected exception as ENGINE_ERROR, its traceback kept for the
    parent's log (CPython's _ExceptionWithTraceback does the same for its pools)."""
    import traceback

    e = PoolError(ErrorKind.ENGINE_ERROR, f"{type(err).__name__}: {err}")
    e.traceback = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return e


@dataclass(frozen=True)
class Turn:
    """One line of the script: speaker index (0-based) and what they say."""

    speaker: int
    text: str


@dataclass(frozen=True)
class Request:
    """A synthesis request as a worker sees it.

    voices[i] is the voice sample of speaker i: a float32 mono numpy array at
    24 kHz, or None when the engine should use its own default.
    """

    id: str
    turns: tuple[Turn, ...]
    voices: tuple[Any, ...] = ()
    cfg_scale: float = 1.3
    inference_steps: int = 10
    seed: int = 0
    max_audio_s: float = 600.0
    stream: bool = False
    attempt: int = 1
    est_audio_s: float = 1.0
    # a request sent again (its worker died, it was preempted or moved) carries the
    # row's history: the engine resumes it at its last step (workers/wire/history.py)
    resume: History | None = None
    priority: str = Priority.INTERACTIVE.value  # a Priority value

    @property
    def text(self) -> str:
        return "\n".join(t.text for t in self.turns)

    @property
    def num_speakers(self) -> int:
        return max((t.speaker for t in self.turns), default=0) + 1


@dataclass(frozen=True)
class DeviceInfo:
    """What a worker reports about the device it loaded its engine on."""

    device: str  # "cuda:0" (as the worker sees it) or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "CPU"
    mem_total_bytes: int = 0
    max_batch_size: int = 1
    engine: str = ""
    note: str = ""  # a line for the log and the page (e.g. "tiny random model")


# ---- parent -> worker ------------------------------------------------------

# A voice sample that cannot change (a read-only array: the presets) crosses a
# worker's queue once; later requests name it. Both ends keep the last
# KEPT_VOICES samples sent, first in first out, so they always agree.
KEPT_VOICES = 16


@dataclass(frozen=True)
class KeptVoice:
    """In Request.voices on a worker's queue: a sample to use and keep as `key`."""

    key: int
    samples: Any


@dataclass(frozen=True)
class VoiceRef:
    """In Request.voices on a worker's queue: the sample kept earlier as `key`."""

    key: int


@dataclass(frozen=True)
class Synthesize:
    request: Request
    following: int = 0  # more Synthesize messages sent right behind this one (batch them)


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class HandBack:
    """Send this row back (answered Preempted; its history is with the parent): its
    worker is being removed, and the row moves to another by resume."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- worker -> parent ------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    worker: int
    pid: int
    info: DeviceInfo
    boot_s: float = 0.0


@dataclass(frozen=True)
class BootFailed:
    error: ErrorKind
    message: str
    traceback: str = ""  # the worker's, when an unexpected exception stopped the load


@dataclass(frozen=True)
class Started:
    id: str
    at: float = 0.0  # time.monotonic() in the worker when the batch began
    from_samples: int = 0  # a resumed row: the audio its history covers (it sends what follows)


@dataclass(frozen=True)
class Chunk:
    id: str
    seq: int
    pcm: Any  # float32 numpy array, mono, SAMPLE_RATE
    history: HistoryDelta | None = None  # the row's steps since the last chunk


@dataclass(frozen=True)
class Done:
    id: str
    audio_s: float
    compute_s: float
    stop_reason: str = StopReason.EOS.value  # why the row stopped (a StopReason value)


@dataclass(frozen=True)
class Failed:
    id: str
    error: ErrorKind
    message: str
    retryable: bool = False
    traceback: str = ""  # the worker's, when an unexpected exception failed it: log only


@dataclass(frozen=True)
class Preempted:
    """The row gave its place to an interactive request: its KV is freed, its history
    (sent with its chunks) is with the parent, and it waits to resume on any worker."""

    id: str
    steps: int = 0  # the decode steps it had made


ToWorker = Synthesize | Cancel | HandBack | Shutdown
FromWorker = Ready | BootFailed | Started | Chunk | Done | Failed | Preempted
ROW_ENDS = (Done, Failed, Preempted)  # a row's last message from a worker
