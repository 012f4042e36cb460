"""Row buckets and captured graphs: one function over static buffers, replayed.

    bucket_for(n) -> b        the smallest of 1/2/4/8/16/32 (then multiples of 32) >= n
    buckets_upto(n)           every bucket a batch of at most n rows can run in
    Graph(fn, inputs, state)  fn(**inputs) -> tuple of tensors, over static input
        buffers; `state`: tensors fn updates in place (the stream slots)
        .run() -> outputs     on CUDA a replay of the captured torch.cuda.CUDAGraph;
                              elsewhere a plain call of fn on the same buffers, so that
                              the bucket and buffer code runs (and is tested) on CPU
        .checked_run(tol)     the same, then fn again eagerly on the same inputs and the
                              same state before it; raises Mismatch beyond `tol`
    make_graph(key, off, ...) a Graph, or None where its capture raised (off is told)

Capture (CUDA): warm-up calls on a side stream, then one capture into a memory pool
that every graph of the worker shares (they replay one at a time, in one stream).
A batch of k rows runs in its bucket: the caller copies its k rows into the first k
rows of the input buffers and reads the first k rows of the outputs; the padded rows
are computed and ignored (every operator of these functions is row-wise).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_for(n: int) -> int:
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


def buckets_upto(n: int) -> list[int]:
    """Every bucket a batch of at most n rows can run in."""
    top = bucket_for(n)
    return [b for b in BUCKETS if b <= top] + list(range(2 * BUCKETS[-1], top + 1, BUCKETS[-1]))


def tolerance(dtype: Any) -> float:
    """Largest difference allowed between a replay and the eager call, relative to the
    eager output's peak: a few units in the last place of the dtype."""
    return {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-4)


class Mismatch(RuntimeError):
    """A captured graph's outputs differ from the eager call's."""


def max_relative(got: torch.Tensor, want: torch.Tensor) -> float:
    peak = want.abs().max().float().clamp(min=1e-6)
    return float((got.float() - want.float()).abs().max() / peak)


def make_graph(key: tuple, off: Callable[[str, tuple], None], *args, **kwargs) -> Graph | None:
    """Graph(*args, **kwargs), or None where making it raised (on CUDA: an operator that
    cannot be captured, out of memory): `off(why, key)` is told why."""
    try:
        return Graph(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to capture means eager
        off(f"capturing failed ({type(exc).__name__}: {exc})", key)
        return None


class Graph:
    def __init__(
        self,
        fn: Callable[..., tuple],
        inputs: dict[str, torch.Tensor],
        state: list[torch.Tensor] | None = None,
        pool: Any = None,
        prepare: Callable[[], None] | None = None,
        scratch_last: bool = False,
    ):
        """`prepare()` sets the inputs to values safe to run before the capture (the
        warm-up calls and the capture run fn; `state` must only move where they say).
        `scratch_last`: the last row of each state tensor is scratch that padded rows
        write (on CUDA, several at once: any one of them wins), left out of the check."""
        self.fn = fn
        self.inputs = inputs
        self.state = state or []
        self.compared = slice(0, -1) if scratch_last else slice(None)
        self.outputs: tuple = ()
        self.graph = None
        device = next(iter(inputs.values())).device
        if device.type == "cuda":
            self._capture(pool, prepare)

    def _capture(self, pool: Any, prepare: Callable[[], None] | None) -> None:
        if prepare is not None:
            prepare()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(**self.inputs)
        current = torch.cuda.current_stream()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = self.fn(**self.inputs)
        except BaseException:
            # an invalidated capture makes capture_end raise inside torch.cuda.graph's
            # __exit__, before it restores the stream: the worker, going on eager,
            # would run on the capture stream from then on
            torch.cuda.set_stream(current)
            raise

    def run(self) -> tuple:
        if self.graph is None:
            self.outputs = self.fn(**self.inputs)
        else:
            self.graph.replay()
        return self.outputs

    def checked_run(self, tol: float) -> tuple:
        """run(), compared with an eager call of fn from the same state. On a match the
        outputs are the run's; on a mismatch the state is left as the eager call left it
        and Mismatch carries the eager outputs (`.eager`)."""
        before = [t.clone() for t in self.state]
        got = tuple(t.clone() for t in self.run())
        after = [t.clone() for t in self.state]
        for t, b in zip(self.state, before, strict=True):
            t.copy_(b)
        want = self.fn(**self.inputs)
        worst = max(
            [max_relative(g, w) for g, w in zip(got, want, strict=True)]
            + [
                max_relative(a[self.compared], t[self.compared])
                for a, t in zip(after, self.state, strict=True)
            ]
        )
        if worst > tol:
            err = Mismatch(f"captured graph differs from eager by {worst:.3g} (> {tol:.3g})")
            err.eager = want
            raise err
        return got
