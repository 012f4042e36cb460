"""The LM's decode step as captured graphs (engine_mode "graphs-lm"): decode_lm's
forward over static buffers, one graph per bucket of branch-rows (graphs.bucket_for
over the step's 2n seqs) and of block-table width (a power of two of blocks).

    LMGraphs(decode_lm, attn_implementation, device, dtype)
    run(step, embeds) -> hidden (2n, H), or None   the step of paged_kv.begin, as a
        replay; None once graphs are off for this worker (the caller runs decode_lm)

Whether the LM pays for capture is a measurement (vLLM-Omni found its captured LM
12-18% slower and left it eager): so this mode is opt-in, beside "graphs" (the
diffusion loop and the audio decode alone), and bench/bench_gpu_1p5b.py runs eager,
graphs and graphs-lm side by side.

A step of m seqs runs in its bucket R >= m: the real seqs' input embeddings, write
slots, positions and block tables go into the first m rows of the static buffers. The
padded rows [m, R) get position 0, a table of block 0 and block 0's first slot to
write: block 0 is never handed out, so they touch no seq's KV, and the graph zeroes
block 0 again at its end (padded reads of the eager path expect it zero). Columns past
a seq's blocks in its table may hold stale block numbers from an earlier step of the
same graph: they are masked (gather path) or past the seq's length (flash), and never
out of the pool (it only grows while the graphs live).

A graph holds the pool's address and layout: when the pool is grown or let go
(paged_kv), every graph is dropped and made again on first need; `drop()` does it at
once (the engine's reset: each graph's function holds the PagedKV it was made over,
and with it that pool, which a reset after out-of-memory must give back before the
rows' retry grows a new one beside it). Each graph's first
CHECKED_RUNS replays are compared with decode_lm's eager forward of the same step (it
writes the same column again); beyond the dtype's tolerance, or where a capture
raises, the worker logs a warning and runs the LM eagerly from then on (its outputs
are the eager ones).
On CPU the graphs are plain calls over the same buffers (graphs.Graph), so the
bucket and padding code runs in the tests.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.engines.vibevoice.graphs import (
    Graph,
    bucket_for,
    make_graph,
    max_relative,
    tolerance,
)
from workers.engines.vibevoice.paged_kv import PagedKV, StepCache

log = logging.getLogger("vibevoice_pool.worker")
CHECKED_RUNS = 2  # replays of each graph compared with the eager forward


def width_bucket(blocks: int) -> int:
    """The table width a step of `blocks` blocks runs at: the next power of two."""
    return 1 << max(0, blocks - 1).bit_length()


class LMGraphs:
    def __init__(self, decode_lm: Any, attn_implementation: str, device: Any, dtype: Any):
        self.decode_lm = decode_lm
        self.attn = attn_implementation
        self.tol = tolerance(dtype)
        self.graphs: dict[tuple[int, int], Graph] = {}
        self.checks_left: dict[tuple[int, int], int] = {}
        self.made_over: tuple = ()  # the KV pool the graphs were made over: address, shape
        self.made = 0  # graphs made, remade ones included
        cuda = str(device).startswith("cuda")
        self.mem_pool = torch.cuda.graph_pool_handle() if cuda else None
        self.on = True

    def run(self, step: StepCache, embeds: torch.Tensor) -> torch.Tensor | None:
        if not self.on:
            return None
        m, used = embeds.shape[0], step.table.shape[1]
        key = (bucket_for(m), width_bucket(used))
        pool = step.kv.pool
        over = (pool.data_ptr(), tuple(pool.shape))
        if over != self.made_over:  # grown or let go: the graphs read a pool that is gone
            self.graphs.clear()
            self.checks_left.clear()
            self.made_over = over
        graph = self.graphs.get(key) or self._capture(key, step.kv, embeds)
        if graph is None:
            return None
        ins = graph.inputs
        ins["embeds"][:m].copy_(embeds)
        ins["write"][:m].copy_(step.write)
        ins["positions"][:m].copy_(step.positions[:, 0])
        ins["table"][:m, :used].copy_(step.table)
        if m < key[0]:
            ins["write"][m:].zero_()
            ins["positions"][m:].zero_()
            ins["table"][m:].zero_()
        (hidden,) = graph.run()
        if not self.checks_left.get(key):
            return hidden[:m]
        self.checks_left[key] -= 1
        got = hidden[:m].clone()
        extra = {"paged_step": step} if step.flash else {}
        want = self.decode_lm.decode(embeds, step, self.attn, **extra)
        worst = max_relative(got, want)
        if worst > self.tol:
            self._off(f"captured graph differs from eager by {worst:.3g} (> {self.tol:.3g})", key)
            return want
        return got

    def drop(self) -> None:
        """Every graph let go now (with the KV pool and the memory they hold); they are
        made again on first need."""
        self.graphs.clear()
        self.checks_left.clear()
        self.made_over = ()

    def _capture(self, key: tuple[int, int], kv: PagedKV, like: torch.Tensor) -> Graph | None:
        rows, width = key
        dev = like.device
        inputs = {
            "embeds": torch.zeros(rows, *like.shape[1:], device=dev, dtype=like.dtype),
            "write": torch.zeros(rows, device=dev, dtype=torch.long),
            "positions": torch.zeros(rows, device=dev, dtype=torch.long),
            "table": torch.zeros(rows, width, device=dev, dtype=torch.long),
        }
        bt = kv.block_tokens

        def fn(embeds, write, positions, table):
            gathered = None
            if kv.flash is None:  # a graph-time buffer, reused by the next graph's replay
                shape = (rows * width, *kv.pool.shape[2:])
                gathered = torch.empty(shape, dtype=kv.dtype, device=dev)
            step = StepCache(kv, write, positions, table, width * bt, gathered)
            extra = {"paged_step": step} if step.flash else {}
            hidden = self.decode_lm.decode(embeds, step, self.attn, **extra)
            kv.pool[:, 0].zero_()  # the padded rows' writes
            return (hidden,)

        def prepare():  # warm-up and capture write block 0 alone
            for name in ("write", "positions", "table"):
                inputs[name].zero_()

        graph = make_graph(key, self._off, fn, inputs, pool=self.mem_pool, prepare=prepare)
        if graph is None:
            return None
        self.graphs[key] = graph
        self.checks_left[key] = CHECKED_RUNS
        self.made += 1
        return graph

    def _off(self, why: str, key: tuple[int, int]) -> None:
        log.warning(
            "engine_mode graphs-lm: %s for the LM at %d rows, %d blocks; this worker runs "
            "the LM eagerly",
            why,
            *key,
        )
        self.on = False
        self.graphs.clear()
        self.checks_left.clear()
