"""The LM's KV bookkeeping per decode step and per leave, dense against paged, on CPU.

Dense is what the step engine did before the paged cache (and what transformers'
DynamicCache does): per layer one (rows, kv_heads, length, dim) tensor for keys and one
for values, the step's column appended with `cat`, a leaving row dropped with
`index_select` of every other row. Paged is workers/engines/vibevoice/paged_kv.py on the
gather path (sdpa/eager): the column written in place, each row's blocks gathered per
layer; a leave frees blocks, a join copies the newcomer's prompt only. The model's
widths are the 1.5B's (28 layers, 2 KV heads of 128), float32; no attention runs, only
the cache's own work. Medians of repeated runs, milliseconds.

    python -m bench.kv_cache_cost [--rows 32] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import sys

from bench.timing import median_ms

LAYERS, KV_HEADS, HEAD_DIM = 28, 2, 128


def main() -> int:
    import torch

    from workers.engines.vibevoice.paged_kv import PagedKV

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32, help="branch-rows (2 per request)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens each row holds")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, tokens = args.rows, args.tokens
    shape = (rows, KV_HEADS, tokens, HEAD_DIM)
    keys = [torch.randn(shape) for _ in range(LAYERS)]
    values = [torch.randn(shape) for _ in range(LAYERS)]
    column = torch.randn(rows, KV_HEADS, 1, HEAD_DIM)
    stay = torch.arange(rows - 1)

    def dense_step():
        for k, v in zip(keys, values, strict=True):
            torch.cat([k, column], dim=2), torch.cat([v, column], dim=2)

    def dense_leave():
        for k, v in zip(keys, values, strict=True):
            k.index_select(0, stay), v.index_select(0, stay)

    kv = PagedKV(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    seqs = [kv.seq() for _ in range(rows)]
    prompt = [(k[:1], v[:1]) for k, v in zip(keys, values, strict=True)]
    for seq in seqs:
        kv.store_prompt([seq], prompt, [tokens])
    short = [(k[:, :, :16], v[:, :, :16]) for k, v in prompt]

    def paged_step():
        step = kv.begin(seqs)
        for layer in range(LAYERS):
            step.update(column, column, layer)

    def paged_leave_and_join():
        kv.release(seqs.pop())
        seqs.append(kv.seq())
        kv.store_prompt([seqs[-1]], short, [16])

    r = args.repeats
    print(f"{rows} branch-rows x {tokens} tokens, {LAYERS} layers x {KV_HEADS}x{HEAD_DIM}, fp32")
    print("| work | dense (cat / index_select) | paged |")
    print("|---|---|---|")
    print(
        f"| one decode step | {median_ms(dense_step, r):.1f} ms | {median_ms(paged_step, r):.1f} ms |"
    )
    leave, swap = median_ms(dense_leave, r), median_ms(paged_leave_and_join, r)
    print(f"| a row leaves (paged: and a 16-token row joins) | {leave:.1f} ms | {swap:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
