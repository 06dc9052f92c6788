"""Tests of fusedattn.integrations.transformers: attn_implementation="fusedattn" in Hugging Face models.

Each family is a tiny random model built from a config (no downloads). The same weights run with
transformers' own attention ("sdpa", or "eager" where sdpa cannot: Gemma-2's softcap, gpt-oss's
sinks, BLOOM) and with fusedattn, switched by set_attn_implementation (BLOOM: patch_bloom). Checked:
logits with and without padding (left padding for decoders, right for BERT), greedy generate()
with a dynamic and a static cache, and every parameter gradient of a training step; T5 (an
encoder-decoder with a learned position bias) the same. The attention function alone is checked
against transformers' sdpa integration (mask rules) and a float64 formula (softcap, sinks, sliding
window). fp32 results agree to ~1e-5 relative; in bf16 fusedattn errs (vs a float64 run) at most 2x
as much as transformers' own attention (DESIGN.md). Training with attention dropout is reproducible.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedattn.integrations import transformers as fusedattn_hf  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

VOCAB, SEQLEN, BATCH = 128, 20, 3
# initializer_range 0.2 (not 0.02) so that attention is far from uniform and masking errors show.
DECODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, initializer_range=0.2, pad_token_id=0)


@dataclass
class Family:
    make_config: Callable[[], object]
    reference: str = "sdpa"          # transformers' own attention to compare with
    decoder: bool = True             # causal LM (left padding, generate) or encoder (BERT)
    bloom: bool = False              # attention patched by patch_bloom rather than selected by name


FAMILIES = {
    "llama": Family(lambda: transformers.LlamaConfig(**DECODER)),
    # Qwen2: the second layer slides (window 8 < SEQLEN), the first is full: a hybrid cache.
    "qwen2": Family(lambda: transformers.Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=8,
                                                     max_window_layers=1)),
    "mistral": Family(lambda: transformers.MistralConfig(**DECODER, sliding_window=8)),
    "gemma2": Family(lambda: transformers.Gemma2Config(**DECODER, head_dim=16, query_pre_attn_scalar=16,
                                                       attn_logit_softcapping=2.0, sliding_window=8),
                     reference="eager"),
    "gpt_oss": Family(lambda: transformers.GptOssConfig(**{**DECODER, "intermediate_size": 64}, head_dim=16,
                                                        num_local_experts=4, num_experts_per_tok=2,
                                                        sliding_window=8),
                      reference="eager"),
    # DeepSeek-V3's multi-head latent attention: q and k of head_dim 24 (16 + 8 rotary), v of 16.
    "deepseek_v3": Family(lambda: transformers.DeepseekV3Config(
        **{**DECODER, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "gpt2": Family(lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   initializer_range=0.2, pad_token_id=0)),
    "bert": Family(lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                   initializer_range=0.2, pad_token_id=0),
                   decoder=False),
    "bloom": Family(lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                                     initializer_range=0.2, pad_token_id=0),
                    reference="eager", bloom=True),
}
DECODERS = [name for name, family in FAMILIES.items() if family.decoder]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fusedattn_hf.register()


def build(name: str):
    """(model in the reference implementation, switch) where switch() moves it to fusedattn."""
    family = FAMILIES[name]
    auto = transformers.AutoModelForCausalLM if family.decoder else transformers.AutoModelForMaskedLM
    model = auto.from_config(family.make_config(), attn_implementation=family.reference)

    def switch():
        if family.bloom:
            fusedattn_hf.patch_bloom(model)
        else:
            model.set_attn_implementation("fusedattn")
            assert model.config._attn_implementation == "fusedattn"

    return model, switch


def inputs(name: str, padded: bool):
    """input_ids (BATCH, SEQLEN) and attention_mask; padded rows have 4 and 11 pads (left for decoders)."""
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQLEN))
    mask = torch.ones(BATCH, SEQLEN, dtype=torch.long)
    if padded:
        for row, pads in ((1, 4), (2, 11)):
            if FAMILIES[name].decoder:
                mask[row, :pads] = 0
            else:
                mask[row, SEQLEN - pads :] = 0
        input_ids = input_ids.masked_fill(mask == 0, 0)
    return input_ids, mask


def assert_close_fp32(got, ref, rtol=1e-5, name=""):
    """|got - ref| <= rtol · (|ref| + max|ref|): DESIGN.md's ~1e-5 relative for fp32."""
    bound = rtol * (ref.abs() + ref.abs().max()) + 1e-7
    err = (got - ref).abs()
    assert not got.isnan().any(), f"{name}: NaN"
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}"


# ---------------------------------------------------------------- whole models

@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match(name, padded):
    model, switch = build(name)
    model.eval()
    input_ids, mask = inputs(name, padded)
    with torch.no_grad():
        ref = model(input_ids, attention_mask=mask).logits
        switch()
        got = model(input_ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions' outputs are not defined the same way by every implementation
    assert_close_fp32(got[real], ref[real], name=name)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_matches(name, cache_implementation):
    model, switch = build(name)
    model.eval()
    input_ids, mask = inputs(name, padded=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache_implementation)
    ref = model.generate(input_ids, **kwargs)
    switch()
    got = model.generate(input_ids, **kwargs)
    assert got.shape == (BATCH, SEQLEN + 6)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_gradients_match(name):
    model, switch = build(name)
    model.train()
    input_ids, mask = inputs(name, padded=True)
    real = mask.bool()
    targets = torch.randint(0, VOCAB, (BATCH, SEQLEN))

    def grads():
        # The loss reads real positions only. (transformers' shifted LM loss would also read the last
        # left pad's logits, which the implementations define differently: a row that sees no key is
        # 0 for fusedattn and torch's SDPA, the mean of all values for "eager".)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits[real], targets[real]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    switch()
    got = grads()
    assert got.keys() == ref.keys() and len(got) > 10
    for param, grad in ref.items():
        assert_close_fp32(got[param], grad, rtol=3e-5, name=f"{name} {param}")


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_bf16_logits_within_torch_error(name):
    """bf16: fusedattn's logits err (vs a float64 run) at most 2x as much as transformers' own attention's."""
    model, switch = build(name)
    model.eval()
    input_ids, mask = inputs(name, padded=True)
    real = mask.bool()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids, attention_mask=mask).logits[real]
        model.bfloat16()
        torch_bf16 = model(input_ids, attention_mask=mask).logits[real].double()
        switch()
        fused_bf16 = model(input_ids, attention_mask=mask).logits[real].double()
    torch_error = (torch_bf16 - ref).abs().max().item()
    assert (fused_bf16 - ref).abs().max().item() <= 2 * torch_error + 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_training_with_attention_dropout(name):
    """Dropout inside fusedattn: finite gradients, masks drawn from torch's seed (reproducible)."""
    family = FAMILIES[name]
    config = family.make_config()
    config.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=family.reference)
    if family.bloom:
        fusedattn_hf.patch_bloom(model)
    else:
        model.set_attn_implementation("fusedattn")
    input_ids, mask = inputs(name, padded=True)

    def loss(train):
        model.train(train)
        torch.manual_seed(5)
        return model(input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)).loss

    value = loss(True)
    value.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    assert loss(True).item() == value.item()
    assert loss(False).item() != value.item()


def test_patched_bloom_with_fusedattn_masks():
    """patch_bloom also runs under attn_implementation "fusedattn", whose masks are bool or None."""
    model, _ = build("bloom")
    model.eval()
    input_ids, mask = inputs("bloom", padded=True)
    with torch.no_grad():
        ref = [model(input_ids, attention_mask=m).logits for m in (mask, None)]
        fusedattn_hf.patch_bloom(model).set_attn_implementation("fusedattn")
        got = [model(input_ids, attention_mask=m).logits for m in (mask, None)]
    assert_close_fp32(got[0][mask.bool()], ref[0][mask.bool()], name="padded")
    assert_close_fp32(got[1], ref[1], name="no mask")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    tokens = model.generate(input_ids, **kwargs)
    model.set_attn_implementation("eager")
    assert torch.equal(tokens, model.generate(input_ids, **kwargs))


def test_t5_position_bias_and_cross_attention():
    """T5 hands its learned relative-position bias to the attention function (position_bias): it
    joins the mask as a float bias, and gets its gradient through fusedattn's float-mask backward."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, initializer_factor=1.5, pad_token_id=0, decoder_start_token_id=0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa")
    input_ids, mask = inputs("bert", padded=True)  # right padding, as for an encoder
    decoder_ids = torch.randint(1, VOCAB, (BATCH, 7))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run()
    model.set_attn_implementation("fusedattn")
    logits, grads = run()
    assert_close_fp32(logits, ref_logits, name="t5 logits")
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in grads
    for param, grad in ref_grads.items():
        assert_close_fp32(grads[param], grad, rtol=3e-5, name=f"t5 {param}")
    model.eval()
    tokens = [model.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)]
    model.set_attn_implementation("sdpa")
    tokens.append(model.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    assert torch.equal(*tokens)


def test_from_pretrained_with_fusedattn(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES["llama"].make_config(), attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fusedattn")
    assert loaded.config._attn_implementation == "fusedattn"
    input_ids, mask = inputs("llama", padded=True)
    with torch.no_grad():
        ref, got = (m.eval()(input_ids, attention_mask=mask).logits for m in (model, loaded))
    assert_close_fp32(got[mask.bool()], ref[mask.bool()])


# ---------------------------------------------------------------- the attention function alone

class _Module(torch.nn.Module):
    """What attention functions read from the calling attention module."""

    def __init__(self, is_causal=True, groups=1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


def _qkv(seqlen_q, seqlen_k, num_heads=4, num_kv_heads=2, head_dim=16):
    return (torch.randn(2, num_heads, seqlen_q, head_dim), torch.randn(2, num_kv_heads, seqlen_k, head_dim),
            torch.randn(2, num_kv_heads, seqlen_k, head_dim))


@pytest.mark.parametrize("case", ["no-mask-causal", "no-mask-static-prefill", "no-mask-decode", "no-mask-encoder",
                                  "bool-mask", "float-mask", "bool-mask-cached-chunk"])
def test_attention_forward_matches_sdpa_integration(case):
    """The rules of transformers' sdpa integration: a mask is used as is; no mask = top-left causal
    for several queries (a static-cache prefill: keys past seqlen_q are empty slots), none for one."""
    seqlen_q, seqlen_k = {"no-mask-static-prefill": (6, 10), "no-mask-decode": (1, 9),
                          "bool-mask-cached-chunk": (3, 9)}.get(case, (7, 7))
    q, k, v = _qkv(seqlen_q, seqlen_k)
    module = _Module(is_causal=case != "no-mask-encoder", groups=2)
    mask = None
    if "mask" in case and not case.startswith("no-mask"):
        visible = torch.rand(2, 1, seqlen_q, seqlen_k) > 0.3
        visible[..., 0] = True
        mask = visible if case.startswith("bool") else torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, weights = fusedattn_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and got.shape == (2, seqlen_q, 4, 16)
    assert_close_fp32(got, ref)


def _eager(q, k, v, *, scaling, softcap=None, sinks=None, window=None, q_offset=0):
    """Plain attention in float64 with Gemma-2's softcap, gpt-oss's sinks and a causal sliding window."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    position = torch.arange(q.shape[2])[:, None] + q_offset
    key = torch.arange(k.shape[2])[None, :]
    visible = key <= position
    if window is not None:
        visible &= key > position - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat((scores, sinks.double()[None, :, None, None].expand(*scores.shape[:3], 1)), dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., : k.shape[2]]
    return (probs @ v).transpose(1, 2)


def test_attention_forward_softcap_sinks_window():
    q, k, v = _qkv(12, 12)
    module = _Module(groups=2)
    sinks = torch.randn(4)
    got, _ = fusedattn_hf.attention_forward(module, q, k, v, None, scaling=0.5, softcap=1.5, s_aux=sinks,
                                            sliding_window=4)
    assert_close_fp32(got.double(), _eager(q, k, v, scaling=0.5, softcap=1.5, sinks=sinks, window=4))
    # One decoding query (no mask): it is the newest token, so the window counts back from the last key.
    got, _ = fusedattn_hf.attention_forward(module, q[:, :, -1:], k, v, None, scaling=0.5, sliding_window=4)
    assert_close_fp32(got.double(), _eager(q[:, :, -1:], k, v, scaling=0.5, window=4, q_offset=11))


def test_attention_forward_dropout_follows_torch_seed():
    q, k, v = _qkv(8, 8)
    module = _Module(groups=2)

    def run(dropout):
        torch.manual_seed(7)
        return fusedattn_hf.attention_forward(module, q, k, v, None, dropout=dropout)[0]

    assert torch.equal(run(0.5), run(0.5))
    assert not torch.allclose(run(0.5), run(0.0))


@pytest.mark.parametrize("masks", ["eager", "fusedattn"])
def test_patched_bloom_with_holes_in_the_mask(masks):
    """A mask with zeros between ones (packed sequences) shifts BLOOM's ALiBi positions after each
    hole; patch_bloom then adds BLOOM's alibi tensor as a bias (it read only the slopes, and its
    logits differed from BLOOM's own by 0.2). Against the unpatched model, eager masks or fusedattn's."""
    model, _ = build("bloom")
    model.eval()
    input_ids, mask = inputs("bloom", padded=True)
    mask[0, 3:6] = 0  # a hole in an unpadded row
    mask[2, 13:15] = 0  # and one after a row's left padding
    with torch.no_grad():
        ref = model(input_ids, attention_mask=mask).logits
        fusedattn_hf.patch_bloom(model)
        if masks == "fusedattn":
            model.set_attn_implementation("fusedattn")
        got = model(input_ids, attention_mask=mask).logits
    assert_close_fp32(got[mask.bool()], ref[mask.bool()], name="holes")


def test_patch_bloom_needs_bloom():
    with pytest.raises(ValueError, match="no BloomAttention"):
        fusedattn_hf.patch_bloom(torch.nn.Linear(2, 2))
