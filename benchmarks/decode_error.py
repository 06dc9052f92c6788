"""bf16 decode's error against the fp64 reference, next to torch SDPA's in bf16.

One token of the inference issue's GQA decode shape (Hq = 32, Hkv = 8, D = 128; B = 2) over
contiguous bf16 caches of a few lengths, several random draws each: the largest absolute
difference of fusedattn.attention_with_kvcache's output from the fp64 reference, and of torch's
bf16 scaled_dot_product_attention's (DESIGN.md's tolerance allows twice torch's error). Shows what
decode's probabilities rounded to bf16 for the P·V products (VDPBF16PS) cost in accuracy;
`PYTHONPATH=DIR` runs another install.

    python benchmarks/decode_error.py [--lengths 16,300,4096] [--draws 4]
"""

from __future__ import annotations

import argparse

import torch

import fusedattn
from fusedattn import reference

BATCH, HEADS, HEADS_KV, HEAD_DIM = 2, 32, 8, 128


def max_errors(length: int, seed: int) -> tuple[float, float]:
    """(fusedattn's, torch SDPA's) largest absolute error against the fp64 reference."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, generator=generator).bfloat16()
    k, v = (torch.randn(BATCH, length, HEADS_KV, HEAD_DIM, generator=generator).bfloat16() for _ in range(2))
    out = fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=torch.full((BATCH,), length, dtype=torch.int32))
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    expected, _ = reference.attention_reference(q_t.double(), k_t.double(), v_t.double(), causal=True)
    expected = torch.as_tensor(expected).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, enable_gqa=True).transpose(1, 2)
    return (out.double() - expected).abs().max().item(), (sdpa.double() - expected).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16,300,4096", help="cached tokens, comma-separated")
    parser.add_argument("--draws", type=int, default=4, help="random draws per length (default 4)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if min(lengths) < 1 or args.draws < 1:
        parser.error("--lengths and --draws must be >= 1")
    print(f"bf16 decode, B {BATCH}, Hq {HEADS}, Hkv {HEADS_KV}, D {HEAD_DIM}: largest |error| against the fp64 "
          f"reference over {args.draws} draws\n")
    print("| L | fusedattn | torch SDPA (bf16) | ratio |")
    print("|---:|---:|---:|---:|")
    for length in lengths:
        errors = [max_errors(length, seed) for seed in range(args.draws)]
        ours, torch_error = max(e[0] for e in errors), max(e[1] for e in errors)
        print(f"| {length} | {ours:.3e} | {torch_error:.3e} | {ours / torch_error:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
