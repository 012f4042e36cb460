"""Speaking speed: audio made faster or slower with its pitch kept (OpenAI's `speed`).

    check_speed(value)          the factor (1.0 for None); BAD_INPUT outside MIN-MAX
    seconds_at(audio_s, speed)  the length that many seconds have once stretched
    stretch(pcm, factor)        a whole clip, round(len(pcm) / factor) samples long
    Stretcher(factor)           push(pcm) per chunk -> what is ready; end() -> the rest
    StretchedEncoder(enc, f)    an encoders.StreamEncoder that stretches what it is fed

The stretch is FFmpeg's `atempo` filter (WSOLA: overlapping windows placed where the
waveform matches best, so the pitch stays) through PyAV. One atempo blends its
windows for factors of 0.5-2.0 and skips samples above that, so a factor outside
that range is a chain of equal steps inside it (4.0 = 2.0 x 2.0, 0.25 = 0.5 x 0.5).

A stream stays a stream: each chunk pushed gives back what the filter has finished
(it holds back about one window, tens of milliseconds), and end() pads the input
with silence to flush the filter, then cuts the output so the whole is exactly
round(samples in / factor) long, the length a client computes from the factor.

Cost on one core of the 2-core dev machine, per second of audio: 1-4 ms, 9 ms at
0.25 (two filters); section 4d of docs/PERFORMANCE.md (bench/tempo/). Whole clips
and pushes run off the event loop (a thread, as the codecs' do).
"""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np

from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError

MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range
STEP_RANGE = (0.5, 2.0)  # what one atempo blends without skipping samples
FLUSH_PAD = 4096  # silence pushed at the end: more than the chain holds back


def check_speed(value) -> float:
    """The speed factor a request asks for: 1.0 for None, BAD_INPUT outside the range."""
    if value is None:
        return 1.0
    speed = float(value)
    if not (MIN_SPEED <= speed <= MAX_SPEED) or math.isnan(speed):
        raise PoolError(
            ErrorKind.BAD_INPUT, f"speed {value!r} is out of range; use {MIN_SPEED}-{MAX_SPEED}"
        )
    return speed


def seconds_at(audio_s: float, speed: float) -> float:
    """The length of `audio_s` seconds of audio stretched to `speed` (as end() cuts it)."""
    return round(round(audio_s * SAMPLE_RATE) / speed) / SAMPLE_RATE


def steps(factor: float) -> list[float]:
    """Equal atempo steps inside STEP_RANGE whose product is `factor`."""
    n = max(1, math.ceil(abs(math.log2(factor)) - 1e-9))
    return [factor ** (1 / n)] * n


class Stretcher:
    """A streaming stretch of float32 mono SAMPLE_RATE audio (see the module docstring).
    push() and end() may run in a thread; close() from another one is safe. The filter
    is built on the first push (loading FFmpeg's libraries takes a few hundred ms the
    first time: in the thread, not on the event loop)."""

    def __init__(self, factor: float):
        self.factor = check_speed(factor)
        self.samples_in = 0
        self.samples_out = 0
        self._lock = threading.Lock()
        self._graph = None
        self._ended = False

    def _build(self):
        import av.filter  # PyAV: imported on first use (it loads FFmpeg's libraries)

        graph = av.filter.Graph()
        node = graph.add_abuffer(
            format="flt", sample_rate=SAMPLE_RATE, layout="mono", time_base=Fraction(1, SAMPLE_RATE)
        )
        for step in steps(self.factor):
            nxt = graph.add("atempo", f"tempo={step!r}")
            node.link_to(nxt)
            node = nxt
        sink = graph.add("abuffersink")
        node.link_to(sink)
        graph.configure()
        return graph

    @property
    def target(self) -> int:
        """The output's length once end() has run."""
        return round(self.samples_in / self.factor)

    def _feed(self, x: np.ndarray) -> None:
        import av

        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = Fraction(1, SAMPLE_RATE)
        frame.pts = self.samples_in
        self._graph.push(frame)

    def _drain(self) -> list[np.ndarray]:
        import av

        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (BlockingIOError, EOFError, av.error.EOFError):
                return out
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))

    def _give(self, parts: list[np.ndarray], limit: int | None = None) -> np.ndarray:
        y = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if limit is not None:
            y = y[: max(0, limit - self.samples_out)]
        self.samples_out += len(y)
        return y

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """What the stretch has ready after `pcm` (possibly nothing yet)."""
        x = np.ascontiguousarray(np.asarray(pcm, dtype=np.float32).reshape(-1))
        with self._lock:
            if self._ended:
                return np.zeros(0, np.float32)
            if self.factor == 1.0:
                self.samples_in += len(x)
                return self._give([x])
            if len(x) == 0:
                return x
            if self._graph is None:
                self._graph = self._build()
            self._feed(x)
            self.samples_in += len(x)
            return self._give(self._drain())

    def end(self) -> np.ndarray:
        """The rest, so that the whole output is `target` samples long."""
        with self._lock:
            if self._ended:
                return np.zeros(0, np.float32)
            self._ended = True
            if self.factor == 1.0 or self.samples_in == 0:
                return np.zeros(0, np.float32)
            if self._graph is None:
                self._graph = self._build()
            n_in = self.samples_in
            self._feed(np.zeros(FLUSH_PAD, np.float32))  # flushes the chain's last window
            self.samples_in = n_in
            self._graph.push(None)
            parts = self._drain()
            target = self.target
            y = self._give(parts, limit=target)
            short = target - self.samples_out
            if short > 0:  # never expected with FLUSH_PAD; keeps the length exact anyway
                y = np.concatenate([y, np.zeros(short, np.float32)])
                self.samples_out += short
            self._graph = None
            return y

    def close(self) -> None:
        """Free the filter without finishing (the client went away)."""
        with self._lock:
            self._ended = True
            self._graph = None


def stretch(pcm: np.ndarray, factor: float) -> np.ndarray:
    """A whole clip at `factor` times its speed. CPU-bound: call it off the event loop."""
    if check_speed(factor) == 1.0:
        return np.asarray(pcm, dtype=np.float32).reshape(-1)
    st = Stretcher(factor)
    head = st.push(pcm)
    return np.concatenate([head, st.end()])


class StretchedEncoder:
    """A StreamEncoder whose input is stretched first: the same start / push / end /
    close, always run in a thread (encoders.run), `samples` counting what it encoded."""

    inline = False
    streams = True

    def __init__(self, enc, factor: float):
        self.enc = enc
        self.stretcher = Stretcher(factor)
        self.format = enc.format
        self.content_type = enc.content_type

    @property
    def samples(self) -> int:
        return self.enc.samples

    def start(self) -> bytes:
        return self.enc.start()

    def push(self, pcm: np.ndarray) -> bytes:
        y = self.stretcher.push(pcm)
        return self.enc.push(y) if len(y) else b""

    def end(self) -> bytes:
        y = self.stretcher.end()
        return (self.enc.push(y) if len(y) else b"") + self.enc.end()

    def close(self) -> None:
        self.stretcher.close()
        self.enc.close()
