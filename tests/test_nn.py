"""Tests of fusedattn.nn: the three attention backends agree, and cached generation is exact.

- attend(): every backend against a float64 reference written here from the masking rule
  (bottom-right causal, key padding, GQA, rows that see no key give 0), outputs and gradients;
- TransformerLM: logits and every parameter gradient equal across "fusedattn", "sdpa" and "naive"
  (fp32: ~1e-5 relative; bf16: at most 2x / 3x the error of torch's own bf16 run against fp64);
- generate(): the KV-cached path (prefill, then one token per step) gives the tokens of a full
  recomputation at every step, for each backend, greedy and sampled; chunked prefill into a
  growing cache equals one forward; a left-padded prompt continues exactly as it would alone.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from fusedattn.nn import (ATTN_BACKENDS, Attention, KVCache, RotaryEmbedding, TransformerBlock, TransformerConfig,
                          TransformerLM, attend)

VOCAB = 61


def tiny_config(**overrides) -> TransformerConfig:
    # init_std 0.2 (not 0.02) so that attention is far from uniform and masking errors show.
    base = dict(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, init_std=0.2)
    return TransformerConfig(**{**base, **overrides})


def padding_mask(batch: int, seqlen: int, side: str | None):
    """(batch, seqlen) bool, True = real token; row b has b·3 pads on `side` (None: no padding)."""
    if side is None:
        return None
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    for b in range(batch):
        pads = min(3 * b, seqlen - 1)
        if side == "left":
            mask[b, :pads] = False
        else:
            mask[b, seqlen - pads :] = False
    return mask


def assert_close_fp32(got, ref, rtol=1e-5, name=""):
    """|got - ref| <= rtol · (|ref| + max|ref|): DESIGN.md's ~1e-5 relative for fp32."""
    bound = rtol * (ref.abs() + ref.abs().max()) + 1e-7
    err = (got - ref).abs()
    assert not got.isnan().any(), f"{name}: NaN"
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}"


def run_model(model, input_ids, attention_mask, backend):
    """Logits and every parameter's gradient of a fixed loss, with `backend`."""
    model.set_attn_backend(backend)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, attention_mask=attention_mask)
    targets = torch.randint(0, VOCAB, input_ids.shape, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


# ---------------------------------------------------------------- attend(): the masking rule per backend

def reference_attend(q, k, v, *, causal, key_padding_mask):
    """float64 attention from the rule: query i at position Lk - Lq + i sees keys j <= it and not padded."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    visible = torch.ones(q.shape[0], 1, seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        for j in range(seqlen_k):
            if causal and j > seqlen_k - seqlen_q + i:
                visible[:, :, i, j] = False
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 9), (1, 11), (4, 13)])
@pytest.mark.parametrize("padded", [False, True])
def test_attend_matches_reference(backend, causal, seqlen_q, seqlen_k, padded):
    batch, num_heads, num_kv_heads, head_dim = 3, 4, 2, 16
    q = torch.randn(batch, num_heads, seqlen_q, head_dim, requires_grad=True)
    k = torch.randn(batch, num_kv_heads, seqlen_k, head_dim, requires_grad=True)
    v = torch.randn(batch, num_kv_heads, seqlen_k, head_dim, requires_grad=True)
    mask = None
    if padded:  # row 0: no padding; row 1: left padding; row 2: every key padded (rows see nothing)
        mask = torch.ones(batch, seqlen_k, dtype=torch.bool)
        mask[1, : seqlen_k // 2] = False
        mask[2] = False
    out = attend(q, k, v, backend=backend, causal=causal, key_padding_mask=mask)
    ref = reference_attend(q.detach(), k.detach(), v.detach(), causal=causal, key_padding_mask=mask)
    assert out.shape == (batch, num_heads, seqlen_q, head_dim)
    assert_close_fp32(out.double(), ref, name="out")
    if padded:
        assert (out[2] == 0).all(), "rows that see no key give exactly 0"

    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference_attend(q64, k64, v64, causal=causal, key_padding_mask=mask).backward(dout.double())
    for got, want, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert_close_fp32(got.double(), want, rtol=3e-5, name=name)


# ---------------------------------------------------------------- TransformerLM: backends agree

MODEL_CASES = [  # (config overrides, padding side)
    (dict(), None),
    (dict(), "left"),
    (dict(), "right"),
    (dict(num_kv_heads=4), "left"),                                  # MHA
    (dict(num_kv_heads=1, rope_base=500000.0), "left"),              # MQA, Llama-3 RoPE base
    (dict(rope_base=None, mlp="gelu", norm="layer", bias=True, tie_embeddings=False), "right"),
    (dict(causal=False), None),                                      # bidirectional encoder
    (dict(causal=False, num_kv_heads=1), "right"),
]


@pytest.mark.parametrize("overrides,padding", MODEL_CASES)
def test_model_backends_agree_fp32(overrides, padding):
    model = TransformerLM(tiny_config(**overrides))
    input_ids = torch.randint(0, VOCAB, (3, 11))
    mask = padding_mask(3, 11, padding)
    logits, grads = run_model(model, input_ids, mask, "fusedattn")
    for backend in ("sdpa", "naive"):
        logits_b, grads_b = run_model(model, input_ids, mask, backend)
        assert_close_fp32(logits, logits_b, name=f"logits vs {backend}")
        for name, grad in grads.items():
            assert_close_fp32(grad, grads_b[name], rtol=3e-5, name=f"grad {name} vs {backend}")


@pytest.mark.parametrize("overrides,padding", [(dict(), "left"), (dict(causal=False, num_kv_heads=1), "right")])
def test_model_bf16_within_torch_error(overrides, padding):
    """bf16 logits (gradients): fusedattn's error vs an fp64 run is <= 2x (3x) that of torch SDPA in bf16."""
    model = TransformerLM(tiny_config(**overrides))
    input_ids = torch.randint(0, VOCAB, (3, 11))
    mask = padding_mask(3, 11, padding)
    ref_logits, ref_grads = run_model(copy.deepcopy(model).double(), input_ids, mask, "naive")
    model_bf16 = copy.deepcopy(model).bfloat16()
    logits, grads = run_model(model_bf16, input_ids, mask, "fusedattn")
    logits_torch, grads_torch = run_model(model_bf16, input_ids, mask, "sdpa")

    def error(x, ref):
        return (x.double() - ref).abs().max().item()

    slack = 1e-3
    assert error(logits, ref_logits) <= 2 * error(logits_torch, ref_logits) + slack * ref_logits.abs().max().item()
    for name, ref in ref_grads.items():
        bound = 3 * error(grads_torch[name], ref) + slack * ref.abs().max().item()
        assert error(grads[name], ref) <= bound, name


def test_block_standalone_backends_agree():
    block = TransformerBlock(40, num_heads=5, num_kv_heads=5, mlp="gelu", norm="layer", rope_base=None, bias=True)
    x = torch.randn(2, 9, 40)
    outputs = {}
    for backend in ATTN_BACKENDS:
        block.attn.attn_backend = backend
        outputs[backend] = block(x)
    assert outputs["fusedattn"].shape == x.shape
    for backend in ("sdpa", "naive"):
        assert_close_fp32(outputs["fusedattn"].detach(), outputs[backend].detach(), name=backend)


# ---------------------------------------------------------------- the KV cache and generate()

@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("padding", [None, "left"])
def test_generate_cache_matches_recompute(backend, padding):
    model = TransformerLM(tiny_config(attn_backend=backend))
    input_ids = torch.randint(0, VOCAB, (3, 7))
    mask = padding_mask(3, 7, padding)
    cached = model.generate(input_ids, 9, attention_mask=mask)
    recomputed = model.generate(input_ids, 9, attention_mask=mask, use_cache=False)
    assert cached.shape == (3, 16)
    assert torch.equal(cached[:, :7], input_ids)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_sampling_cache_matches_recompute(backend):
    model = TransformerLM(tiny_config(attn_backend=backend))
    input_ids = torch.randint(0, VOCAB, (2, 5))

    def sample(use_cache):
        generator = torch.Generator().manual_seed(1234)
        return model.generate(input_ids, 8, temperature=0.8, generator=generator, use_cache=use_cache)

    assert torch.equal(sample(True), sample(False))
    assert torch.equal(sample(True), sample(True))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_chunked_prefill_into_growing_cache(backend):
    """Feeding a sequence in chunks of 1..4 tokens through a growing cache equals one full forward
    (chunks with seqlen_q < seqlen_k exercise the bottom-right rule with several queries)."""
    model = TransformerLM(tiny_config(attn_backend=backend))
    input_ids = torch.randint(0, VOCAB, (2, 14))
    mask = padding_mask(2, 14, "left")
    full = model(input_ids, attention_mask=mask)
    cache = model.new_cache()  # no max_seqlen: buffers grow by doubling
    chunks, start = [], 0
    for size in (3, 1, 4, 2, 1, 3):
        end = start + size
        chunks.append(model(input_ids[:, start:end], attention_mask=mask[:, :end], cache=cache))
        start = end
    assert cache.seqlen() == 14 and cache.keys[0].shape[2] >= 14
    assert_close_fp32(torch.cat(chunks, dim=1).detach(), full.detach(), name="chunked prefill")


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_left_padded_prompt_continues_as_alone(backend):
    model = TransformerLM(tiny_config(attn_backend=backend))
    short, long = torch.randint(0, VOCAB, (1, 4)), torch.randint(0, VOCAB, (1, 9))
    batch = torch.cat((torch.cat((torch.zeros(1, 5, dtype=torch.long), short), dim=1), long))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :5] = False
    logits = model(batch, attention_mask=mask)
    assert_close_fp32(logits[0, 5:].detach(), model(short)[0].detach(), name="padded row")
    tokens = model.generate(batch, 6, attention_mask=mask)
    assert torch.equal(tokens[0, 9:], model.generate(short, 6)[0, 4:])
    assert torch.equal(tokens[1, 9:], model.generate(long, 6)[0, 9:])


def test_kv_cache_preallocated_and_bounded():
    cache = KVCache(num_layers=1, max_seqlen=6)
    k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    keys, values = cache.update(0, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v) and cache.keys[0].shape[2] == 6
    keys, _ = cache.update(0, k[:, :, :2], v[:, :, :2])
    assert cache.seqlen() == 6 and torch.equal(keys[:, :, 4:], k[:, :, :2])
    with pytest.raises(ValueError, match="max_seqlen=6"):
        cache.update(0, k[:, :, :1], v[:, :, :1])


def test_rope_is_a_relative_rotation():
    """q·k after RoPE depends only on the distance between the positions."""
    rotary = RotaryEmbedding(16, base=100.0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(pos_q, pos_k):
        q_rot, _ = rotary(q, q, torch.tensor([pos_q]))
        k_rot, _ = rotary(k, k, torch.tensor([pos_k]))
        return (q_rot * k_rot).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


# ---------------------------------------------------------------- errors and packaging

def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="attn_backend"):
        Attention(32, 4, attn_backend="flash")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(32, 4, 3)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
    model = TransformerLM(tiny_config())
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.randint(0, VOCAB, (2, 5)), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attn_backend"):
        model.set_attn_backend("eager")
    with pytest.raises(ValueError, match="causal"):
        TransformerLM(tiny_config(causal=False)).generate(torch.zeros(1, 2, dtype=torch.long), 1)


def test_fusedattn_import_does_not_load_nn():
    code = "import sys, fusedattn; assert 'fusedattn.nn' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
