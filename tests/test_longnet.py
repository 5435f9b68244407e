"""LongNet dilated attention against a dense reference written from the LongNet definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slidechat import longnet
from slidechat.longnet import (
    LongNetConfig,
    LongNetEncoder,
    _strided_length,
    attention_with_lse,
    attention_with_lse_math,
    cuda_attention_kernel,
    dilated_attention,
    dilated_attention_gather,
    dilated_attention_strided,
)


def dense_reference(q, k, v, segment_lengths, ratios, dtype=torch.float64):
    """Dilated attention with explicit per-branch [H, L, L] masks, combined by softmax normalisers.

    Definition (as the original torchscale code computes it): in branch (w, r) the sequence is
    cut into segments of s = min(w, L) (the last one zero-padded); head j uses offset
    o_j = j // ceil(H / r); query i belongs to head j iff (i mod s) mod r == o_j and then attends
    to the positions p of its segment with (p mod s) mod r == o_j, plus one zero key (score 0,
    value 0) for every slot of the head's sparse segment (ceil(s / r) slots) that falls past the
    segment or sequence end. Branch results are mixed with weights softmax_b(lse_b); a query a
    head does not own in a branch has lse = -1e8 there.
    """
    _, L, H, d = q.shape
    qh, kh, vh = (t[0].transpose(0, 1).to(dtype) for t in (q, k, v))  # [H, L, d]
    scores = qh @ kh.transpose(1, 2) / math.sqrt(d)  # [H, L, L]
    outs, lses = [], []
    pos = torch.arange(L)
    for w, r in zip(segment_lengths, ratios):
        s = min(w, L)
        seg = pos // s
        within = pos % s
        slots = math.ceil(s / r)
        mask = torch.zeros(H, L, L, dtype=torch.bool)
        owned = torch.zeros(H, L, dtype=torch.bool)
        n_zero = torch.zeros(H, L, dtype=dtype)
        per_group = math.ceil(H / r)
        for j in range(H):
            o = j // per_group
            mine = within % r == o
            owned[j] = mine
            mask[j] = mine[:, None] & mine[None, :] & (seg[:, None] == seg[None, :])
            # real keys in the query's segment for this head; the rest of the slots are zero keys
            real = mask[j].sum(1).to(dtype)
            n_zero[j] = torch.where(mine, slots - real, torch.zeros_like(real))
        masked = scores.masked_fill(~mask, float("-inf"))
        lse_real = torch.logsumexp(masked, dim=-1)  # -inf where no real key
        lse = torch.logaddexp(lse_real, torch.log(n_zero))  # zero keys add exp(0) each
        probs = torch.nan_to_num(torch.exp(masked - lse[..., None]))  # rows without keys: 0
        out = probs @ vh  # zero keys contribute nothing to the numerator
        lse = torch.where(owned, lse, torch.full_like(lse, -1e8))
        lse = lse.masked_fill(lse == 0, -1e8)  # quirk of the original, kept for parity
        outs.append(torch.where(owned[..., None], out, torch.zeros_like(out)))
        lses.append(lse.detach())  # the original mixes branches with weights under no_grad
    w = torch.softmax(torch.stack(lses), dim=0)
    out = sum(o * wi[..., None] for o, wi in zip(outs, w))
    return out.transpose(0, 1)[None]  # [1, L, H, d]


CASES = [
    # (heads, segment_lengths, ratios): the SlideChat pattern scaled down, heads < largest ratio
    (8, [16, 32, 64, 128, 256], [1, 2, 4, 8, 16]),
    (4, [4, 8, 16], [1, 2, 4]),
    (3, [5, 10], [1, 4]),  # heads not a multiple of the ratio: head padding
]


@pytest.mark.parametrize("heads,segs,ratios", CASES)
@pytest.mark.parametrize("length", [1, 3, 7, 16, 37, 100, 300])
def test_dilated_attention_matches_dense_reference(heads, segs, ratios, length):
    torch.manual_seed(length * 31 + heads)
    d = 8
    q, k, v = (torch.randn(1, length, heads, d) for _ in range(3))
    ours = dilated_attention(q, k, v, segs, ratios)
    ref = dense_reference(q, k, v, segs, ratios).float()
    assert ours.shape == (1, length, heads, d)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,segs,ratios", CASES)
@pytest.mark.parametrize("length", [1, 7, 37, 100])
def test_gather_and_strided_paths_both_match_dense_reference(heads, segs, ratios, length):
    torch.manual_seed(length * 7 + heads)
    q, k, v = (torch.randn(1, length, heads, 8) for _ in range(3))
    ref = dense_reference(q, k, v, segs, ratios).float()
    torch.testing.assert_close(dilated_attention_gather(q, k, v, segs, ratios), ref, atol=1e-5, rtol=1e-5)
    if _strided_length(length, segs, ratios) is not None:
        torch.testing.assert_close(dilated_attention_strided(q, k, v, segs, ratios), ref, atol=1e-5, rtol=1e-5)


def test_strided_path_covers_slide_lengths_and_refuses_inner_padding():
    slidechat = ([1024, 2048, 4096, 8192, 16384], [1, 2, 4, 8, 16])
    assert _strided_length(16384, *slidechat) == 16384  # no copy at all
    assert _strided_length(38400, *slidechat) == 49152  # three 16384 segments, zero-padded at the end
    assert _strided_length(300, *slidechat) == 304  # one capped segment, padded to a multiple of 16
    assert _strided_length(1, *slidechat) is None  # per_patch sequences: padding would be 16x
    assert _strided_length(100, [10], [3]) is None  # segments of 10 need padding inside: gather
    q = torch.zeros(1, 100, 2, 4)
    with pytest.raises(ValueError, match="padding inside segments"):
        dilated_attention_strided(q, q, q, [10], [3])


@pytest.mark.parametrize("length", [7, 37, 100])
def test_dilated_attention_gradients_match_dense_reference(length):
    torch.manual_seed(length)
    q, k, v = (torch.randn(1, length, 4, 8, requires_grad=True) for _ in range(3))
    g = torch.randn(1, length, 4, 8)
    (dilated_attention(q, k, v, [4, 8, 16], [1, 2, 4]) * g).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (dense_reference(*ref, [4, 8, 16], [1, 2, 4]) * g.double()).sum().backward()
    for ours, r in zip((q, k, v), ref):
        torch.testing.assert_close(ours.grad, r.grad.float(), atol=1e-5, rtol=1e-5)


def test_single_full_branch_is_plain_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, 16) for _ in range(3))
    ours = dilated_attention(q, k, v, [64], [1])
    plain = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [40, 37])  # 37: zero-padded at the end
def test_batched_sequences_are_independent(length):
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, length, 4, 8) for _ in range(3))
    both = dilated_attention(q, k, v, [8, 16], [1, 2])
    one = dilated_attention(q[1:2], k[1:2], v[1:2], [8, 16], [1, 2])
    torch.testing.assert_close(both[1:2], one, atol=1e-6, rtol=1e-6)
    ref = dense_reference(q[2:3], k[2:3], v[2:3], [8, 16], [1, 2]).float()
    torch.testing.assert_close(both[2:3], ref, atol=1e-5, rtol=1e-5)


def test_attention_kernel_returns_logsumexp():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = attention_with_lse_math(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.float(), ref_lse, atol=1e-5, rtol=1e-5)


def _tiny_cfg(**kw) -> LongNetConfig:
    base = dict(embed_dim=32, ffn_dim=64, num_heads=4, num_layers=2, segment_lengths=[4, 8, 16],
                dilated_ratios=[1, 2, 4])
    base.update(kw)
    return LongNetConfig(**base)


def test_parameter_names_follow_torchscale_layout():
    enc = LongNetEncoder(_tiny_cfg(num_layers=1))
    names = set(enc.state_dict())
    expected = {"layer_norm.weight", "layer_norm.bias"}
    for sub in ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                "self_attn.inner_attn_ln", "self_attn_layer_norm", "ffn.fc1", "ffn.ffn_layernorm", "ffn.fc2",
                "final_layer_norm"]:
        expected |= {f"layers.0.{sub}.weight", f"layers.0.{sub}.bias"}
    assert names == expected


def test_default_config_is_slidechat_longnet():
    cfg = LongNetConfig()
    enc = LongNetEncoder(cfg)
    assert (cfg.embed_dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) == (512, 1024, 8, 2)
    assert cfg.segment_lengths == [1024, 2048, 4096, 8192, 16384] and cfg.dilated_ratios == [1, 2, 4, 8, 16]
    # 4,212,736 parameters, as the original prints for LongNet_2_layers_512_dim
    assert sum(p.numel() for p in enc.parameters()) == 4212736
    assert [layer.drop_path.drop_prob for layer in enc.layers] == [0.0, 0.1]


def test_encoder_gradients_and_checkpointing_agree():
    torch.manual_seed(3)
    enc = LongNetEncoder(_tiny_cfg(dropout=0.0, drop_path_rate=0.0)).train()
    x = torch.randn(1, 45, 32)
    enc(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.self_attn.q_proj.weight"].abs().sum() > 0  # attention weights are trained
    enc.zero_grad()
    enc.gradient_checkpointing = True
    enc(x).square().mean().backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_eval_is_deterministic_and_train_uses_dropout():
    torch.manual_seed(4)
    enc = LongNetEncoder(_tiny_cfg())
    x = torch.randn(1, 20, 32)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))
    enc.train()
    assert not torch.allclose(enc(x), enc(x))


@pytest.mark.parametrize("shape", [(1, 300, 32), (300, 1, 32)])  # slide context, per_patch context
def test_inference_in_token_chunks_equals_whole_sequence_forward(monkeypatch, shape):
    torch.manual_seed(5)
    enc = LongNetEncoder(_tiny_cfg()).eval()
    x = torch.randn(*shape)
    whole = enc(x)  # gradients enabled: every op on the whole sequence
    monkeypatch.setattr(longnet, "TOKEN_CHUNK", 64)  # 300 tokens -> 5 chunks, the last one short
    calls = []
    real = longnet.by_token_chunks
    monkeypatch.setattr(longnet, "by_token_chunks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        chunked = enc(x)
    assert len(calls) == 2 * len(enc.layers)  # the chunked path ran
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_drop_path_is_torchscale_stochastic_depth():
    """torchscale's DropPath calls timm's drop_path: whole samples dropped, survivors scaled by 1 / keep."""
    torch.manual_seed(6)
    layer = LongNetEncoder(_tiny_cfg(num_layers=3, drop_path_rate=0.4)).layers[2]
    assert layer.drop_path.drop_prob == pytest.approx(0.4)  # linspace(0, rate, layers)[depth], as torchscale
    x = torch.randn(64, 5, 32)
    layer.train()
    torch.manual_seed(7)
    out = layer.drop_path(x)
    torch.manual_seed(7)  # the same draw, written out: one Bernoulli(keep) per sample
    keep = x.new_empty(64, 1, 1).bernoulli_(0.6)
    torch.testing.assert_close(out, x * keep / 0.6)
    dropped = out.flatten(1).abs().sum(1) == 0
    assert 0 < int(dropped.sum()) < 64
    layer.eval()
    assert layer.drop_path(x) is x


@pytest.mark.parametrize("capability,dtype,head_dim,kernel", [
    ((9, 0), torch.bfloat16, 64, "flash"),      # H100
    ((8, 0), torch.float16, 64, "flash"),       # A100
    ((8, 0), torch.float32, 64, "efficient"),   # no flash kernel for fp32
    ((8, 0), torch.bfloat16, 512, "efficient"),  # head dim beyond flash's 256
    ((7, 0), torch.float16, 64, "efficient"),   # V100: no flash attention before Ampere
    ((7, 5), torch.float32, 64, "efficient"),   # T4
    ((7, 0), torch.bfloat16, 64, "math"),       # bf16 on a V100: no fused kernel at all
])
def test_cuda_kernel_falls_back_where_flash_is_unavailable(capability, dtype, head_dim, kernel):
    assert cuda_attention_kernel(capability, dtype, head_dim) == kernel


def test_cuda_kernel_respects_disabled_backends(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: False)
    assert cuda_attention_kernel((9, 0), torch.bfloat16, 64) == "efficient"
    monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: False)
    assert cuda_attention_kernel((9, 0), torch.bfloat16, 64) == "math"
