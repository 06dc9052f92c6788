"""Hugging Face generate(): tokens/s of a small random Llama with attn_implementation="fusedattn"
against "sdpa", side by side in one run.

Model: LlamaConfig(4 layers, hidden 512, 8 heads, 2 KV heads, intermediate 1376, vocab 32000),
randomly initialised (no download), fp32. Prompt: 1024 random tokens (batch 1), then 64 new
tokens, greedy, dynamic cache. Reported: whole generate() time (prefill + decode) and new
tokens per second, medians over interleaved repetitions; the two runs must produce the same
tokens.

    python benchmarks/bench_hf_generate.py [--reps N] [--prompt 1024] [--new 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fusedattn
from fusedattn.integrations import transformers as fusedattn_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    fusedattn_hf.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt))
    impls = ["sdpa", "fusedattn"]
    times = {impl: [] for impl in impls}
    tokens = {}
    with torch.no_grad():
        for rep in range(args.reps + 1):  # the first round warms up
            for impl in impls:
                model.set_attn_implementation(impl)
                start = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                elapsed = time.perf_counter() - start
                if rep > 0:
                    times[impl].append(elapsed)
                tokens[impl] = out
    same = torch.equal(tokens["sdpa"], tokens["fusedattn"])
    print(f"fusedattn {fusedattn.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Llama 4x512 (8 heads, 2 KV heads), prompt {args.prompt}, {args.new} new tokens, fp32")
    for impl in impls:
        seconds = statistics.median(times[impl])
        print(f"  {impl:10s} generate {seconds * 1e3:8.1f} ms   {args.new / seconds:7.1f} new tokens/s")
    ratio = statistics.median(times["sdpa"]) / statistics.median(times["fusedattn"])
    print(f"  speed-up fusedattn vs sdpa: {ratio:.2f}x; same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
