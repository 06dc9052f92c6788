"""The model-level suites: block (TransformerBlock forward+backward) and lm (TransformerLM.generate).

Both build one module and switch its attention backend between calls (attn_backend "fusedattn",
"sdpa", "naive": reported as fusedattn, torch-sdpa, naive-torch), so every implementation runs
the same weights on the same inputs.

block: fusedattn.nn.TransformerBlock (pre-norm, RMSNorm, SwiGLU, RoPE, causal), forward and
       backward with gradients for the input and every parameter. FLOPs: 6·W·B·L for the
       linear layers (W = their weights' count; forward 2, backward 4) + 3.5× the causal
       attention forward; % peak is of the GEMM peak (model FLOP utilisation). Error: the
       output and input gradient of batch 0 vs the same block in float64 with the naive backend.
lm:    fusedattn.nn.TransformerLM.generate (greedy, KV cache): tokens/s = B·new tokens / time
       (prefill included). FLOPs for % peak: 2·W·tokens processed (prefill B·P tokens, then
       B·(N−1) single-token steps; W includes the output head) + attention (causal prefill,
       then 4·B·H·(P+j)·D per layer for step j). No error column: the output is tokens.
"""

from __future__ import annotations

import copy

from .common import Case, dtype_of
from .forward import forward_flops

BACKENDS = {"fusedattn": "fusedattn", "torch-sdpa": "sdpa", "naive-torch": "naive"}

BLOCK_SHAPES = [(4, 1024, 512, 8)]      # (batch, seqlen, d_model, heads)
BLOCK_QUICK_SHAPES = [(1, 256, 256, 4)]
# (batch, prompt, new tokens); the model is LM_MODEL (LM_QUICK_MODEL with --quick)
LM_SHAPES = [(1, 512, 32)]
LM_QUICK_SHAPES = [(1, 128, 8)]
LM_MODEL = {"num_layers": 4, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 2, "vocab_size": 8192}
LM_QUICK_MODEL = {"num_layers": 2, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 4096}

MODEL_TARGET_SECONDS = {False: 6.0, True: 0.5}
MODEL_REPS_RANGE = (3, 20)


def linear_weights(torch, module) -> int:
    """Number of weights in the nn.Linear layers of module (the matmul FLOPs are 2 per weight per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def block_label(shape) -> str:
    batch, seqlen, hidden, heads = shape
    return f"{batch}x{seqlen} d{hidden} h{heads}"


def block_case(torch, shape, dtype_name, device) -> Case:
    from ..nn import TransformerBlock

    batch, seqlen, hidden, heads = shape
    probe = TransformerBlock(hidden, heads)
    flops = (6.0 * linear_weights(torch, probe) * batch * seqlen
             + 3.5 * forward_flops(batch, heads, seqlen, seqlen, hidden // heads, True))
    del probe

    def prepare():
        dtype = dtype_of(torch, dtype_name)
        torch.manual_seed(0)
        block = TransformerBlock(hidden, heads).to(device=device, dtype=dtype)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, seqlen, hidden, generator=generator).to(device=device, dtype=dtype).requires_grad_()
        dout = torch.randn(batch, seqlen, hidden, generator=generator).to(device=device, dtype=dtype)
        params = list(block.parameters())

        def step(backend):
            block.attn.attn_backend = backend
            out = block(x)
            grads = torch.autograd.grad(out, [x, *params], dout)
            return out.detach(), grads[0]

        calls = {name: (lambda backend=backend: step(backend)) for name, backend in BACKENDS.items()}

        def check(results):
            reference = copy.deepcopy(block).to(device="cpu", dtype=torch.float64)
            reference.attn.attn_backend = "naive"
            x64 = x[:1].detach().to(device="cpu", dtype=torch.float64).requires_grad_()
            out64 = reference(x64)
            (dx64,) = torch.autograd.grad(out64, [x64], dout[:1].to(device="cpu", dtype=torch.float64))
            out64 = out64.detach()
            errors = {}
            for name, (out, dx) in results.items():
                out, dx = (t[:1].to(device="cpu", dtype=torch.float64) for t in (out, dx))
                errors[name] = max(float((out - out64).abs().max()), float((dx - dx64).abs().max()))
            return errors

        return calls, check

    params = {"B": batch, "L": seqlen, "d_model": hidden, "H": heads, "tokens": batch * seqlen}
    return Case("block", block_label(shape), dtype_name, True, params, "GFLOP/s", flops, flops=flops,
                prepare=prepare, target_seconds=dict(MODEL_TARGET_SECONDS), reps_range=MODEL_REPS_RANGE)


def lm_label(shape) -> str:
    batch, prompt, new = shape
    return f"{batch}x{prompt}+{new}"


def lm_flops(torch, model, batch, prompt, new) -> float:
    """FLOPs of generate(): see the module docstring."""
    config = model.config
    head_dim = config.head_dim or config.hidden_size // config.num_heads
    tokens = batch * (prompt + new - 1)
    flops = 2.0 * linear_weights(torch, model) * tokens
    attention = forward_flops(batch, config.num_heads, prompt, prompt, head_dim, True)
    attention += sum(4.0 * batch * config.num_heads * (prompt + step) * head_dim for step in range(1, new))
    return flops + config.num_layers * attention


def lm_case(torch, shape, dtype_name, device, model_config: dict) -> Case:
    from ..nn import TransformerConfig, TransformerLM

    batch, prompt, new = shape
    flops = lm_flops(torch, TransformerLM(TransformerConfig(**model_config)), batch, prompt, new)

    def prepare():
        torch.manual_seed(0)
        model = TransformerLM(TransformerConfig(**model_config)).to(device=device, dtype=dtype_of(torch, dtype_name))
        model.eval()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model_config["vocab_size"], (batch, prompt), generator=generator).to(device)

        def generate(backend):
            model.set_attn_backend(backend)
            return model.generate(ids, new)

        calls = {name: (lambda backend=backend: generate(backend)) for name, backend in BACKENDS.items()}
        return calls, None

    params = {"B": batch, "prompt": prompt, "new_tokens": new, **model_config}
    return Case("lm", lm_label(shape), dtype_name, True, params, "tok/s", batch * new, flops=flops,
                prepare=prepare, target_seconds=dict(MODEL_TARGET_SECONDS), reps_range=MODEL_REPS_RANGE)


def block_cases(torch, shapes, dtypes, device) -> list[Case]:
    return [block_case(torch, s, d, device) for d in dtypes for s in shapes]


def lm_cases(torch, shapes, dtypes, device, quick=False) -> list[Case]:
    model = LM_QUICK_MODEL if quick else LM_MODEL
    return [lm_case(torch, s, d, device, model) for d in dtypes for s in shapes]
