"""LongNet slide encoder in plain PyTorch (dilated attention on `scaled_dot_product_attention` kernels).

A re-implementation of the encoder SlideChat builds with
`make_longnet_from_name("LongNet_2_layers_512_dim")` from its vendored torchscale fork, written so
that the released weights load under the same parameter names and give the same outputs:

* pre-norm encoder layers with sub-LN: `self_attn_layer_norm` -> q/k/v projections -> dilated
  attention -> `self_attn.inner_attn_ln` -> `out_proj` -> dropout -> drop-path -> residual;
  `final_layer_norm` -> `ffn.fc1` -> GELU (computed in fp32) -> `ffn.ffn_layernorm` -> `ffn.fc2`
  -> dropout -> drop-path -> residual; a final `layer_norm`; no positional embedding, embedding
  scale 1.0, dropout on the input embeddings.
* dilated attention, one branch per (segment length, dilation ratio) pair: the (zero-padded)
  sequence is cut into segments of `min(segment_length, L)`; within a segment, head `j` keeps the
  positions `p` with `p % ratio == j // ceil(H / ratio)` (heads are grouped in order; a group may
  be empty when `ratio > H`); each segment is padded with zero keys/values up to a multiple of the
  ratio, and those zero keys *take part* in the softmax (score 0, value 0) exactly as in the
  original, which ran flash attention without a padding mask.
* branch outputs are combined with weights `softmax_b(lse_b)` where `lse_b` is the branch's
  log-sum-exp (the softmax normaliser); positions a head does not own in a branch get
  `lse = -1e8`, and, as in the original, so does any `lse` that is exactly 0. The weights are
  computed without gradient (the original wraps them in `torch.no_grad()`).

Time and memory are linear in the sequence length: every branch touches each position once, and
a query attends to at most `segment_length / ratio` keys per branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# The original marks positions a head does not cover in a branch with this log-normaliser.
_LSE_MASK = -1e8


@dataclass
class LongNetConfig:
    """Settings of the LongNet encoder; defaults are SlideChat's `LongNet_2_layers_512_dim` as built."""

    embed_dim: int = 512
    ffn_dim: int = 1024
    num_heads: int = 8
    num_layers: int = 2
    segment_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    dilated_ratios: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    attention_dropout: float = 0.0
    layernorm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.segment_lengths = [int(s) for s in self.segment_lengths]
        self.dilated_ratios = [int(r) for r in self.dilated_ratios]
        if len(self.segment_lengths) != len(self.dilated_ratios) or not self.segment_lengths:
            raise ValueError("segment_lengths and dilated_ratios must be non-empty and of equal length")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if min(self.segment_lengths) < 1 or min(self.dilated_ratios) < 1:
            raise ValueError("segment lengths and dilation ratios must be >= 1")


# ----------------------------------------------------------------------------------------------
# attention kernels that also return the log-sum-exp


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Softmax attention over the last two dims of `q, k, v` ([B, H, L, d]); returns (out, lse [B, H, L]).

    Uses PyTorch's fused SDPA kernels (the ones behind `F.scaled_dot_product_attention`), which also
    return the softmax normaliser: the flash kernel on CPU; on CUDA the kernel `cuda_attention_kernel`
    picks for the GPU and dtype (flash for fp16/bf16 on Ampere or newer, else memory-efficient).
    Falls back to explicit math elsewhere.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p=dropout_p)
        return out, lse
    if q.device.type == "cuda":
        kernel = cuda_attention_kernel(torch.cuda.get_device_capability(q.device), q.dtype, q.shape[-1])
        # the dilated branches pass strided views; the CUDA kernels' stride rules differ between
        # versions, and a copy costs little there
        q, k, v = (t.contiguous() for t in (q, k, v))
        if kernel == "flash":
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p=dropout_p)
            return res[0], res[1]
        if kernel == "efficient":
            res = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, compute_log_sumexp=True, dropout_p=dropout_p
            )
            return res[0], res[1][..., : q.shape[-2]]
    return attention_with_lse_math(q, k, v, dropout_p)


def cuda_attention_kernel(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> str:
    """The fused CUDA kernel for a GPU of compute `capability`: "flash", "efficient" or "math".

    Flash attention needs fp16/bf16, head dims up to 256 and an Ampere or newer GPU (sm80+); the
    memory-efficient kernel runs fp32 and fp16 from sm50 on, bf16 only on sm80+. Elsewhere (fp16
    or bf16 on a V100 or T4 for flash, bf16 on them at all) the explicit math path is used.
    Kernels switched off with `torch.backends.cuda.enable_*_sdp(False)` are not chosen.
    """
    ampere = capability >= (8, 0)
    if (dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and ampere
            and torch.backends.cuda.is_flash_attention_available() and torch.backends.cuda.flash_sdp_enabled()):
        return "flash"
    if (dtype != torch.bfloat16 or ampere) and capability >= (5, 0) and torch.backends.cuda.mem_efficient_sdp_enabled():
        return "efficient"
    return "math"


def attention_with_lse_math(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Reference softmax attention with log-sum-exp, computed explicitly in fp32."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v.float()).to(q.dtype), lse


# ----------------------------------------------------------------------------------------------
# dilated attention


def _branch_layout(seq_len: int, segment_length: int, ratio: int) -> tuple[int, int]:
    """(segments, slots per segment) of one branch: segments of `min(segment_length, L)`, each padded to a multiple of `ratio`."""
    seg = min(segment_length, seq_len)
    return -(-seq_len // seg), -(-seg // ratio)


def _branch_index(seq_len: int, segment_length: int, ratio: int, num_heads: int, device: torch.device) -> Tensor:
    """Dense position of every (segment, sparse slot, head) of one branch; `seq_len` marks a zero slot.

    Returns a LongTensor [n_segments, slots, H]. Slot `t` of head `j` in segment `s` is position
    `s * seg + r_j + t * ratio` with `seg = min(segment_length, seq_len)` and
    `r_j = j // ceil(H / ratio)`; slots that fall into the padding (past the segment end, or past
    the sequence end) point at the zero row `seq_len`.
    """
    seg = min(segment_length, seq_len)
    n_seg, slots = _branch_layout(seq_len, segment_length, ratio)
    heads_per_group = -(-num_heads // ratio)  # ceil(H / ratio): head padding to a multiple of ratio
    offset = torch.arange(num_heads, device=device) // heads_per_group  # r_j < ratio
    t = torch.arange(slots, device=device)
    within = offset[None, :] + t[:, None] * ratio  # [slots, H], position inside the segment
    pos = torch.arange(n_seg, device=device)[:, None, None] * seg + within[None]  # [n_seg, slots, H]
    invalid = (within[None] >= seg) | (pos >= seq_len)
    return pos.masked_fill(invalid, seq_len)


class DilatedAttention(nn.Module):
    """LongNet multi-branch dilated self-attention with the torchscale parameter names."""

    def __init__(self, cfg: LongNetConfig) -> None:
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.segment_lengths = list(cfg.segment_lengths)
        self.dilated_ratios = list(cfg.dilated_ratios)
        self.attention_dropout = cfg.attention_dropout
        d = cfg.embed_dim
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.layernorm_eps)

    def qkv_weight(self) -> tuple[Tensor, Tensor]:
        """q, k and v projections stacked into one [3D, D] weight and [3D] bias."""
        # one GEMM reads the input once (about 8% faster on CPU than three); the parameters stay
        # in q_proj/k_proj/v_proj under the original names
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        return weight, bias

    def attend(self, qkv: Tensor) -> Tensor:
        """Dilated attention of fused projections qkv [B, L, 3D] -> [B, L, D] (before the sub-LN)."""
        bsz, seq_len, _ = qkv.shape
        q, k, v = qkv.view(bsz, seq_len, 3, self.num_heads, self.head_dim).unbind(2)
        attn = dilated_attention(
            q, k, v, self.segment_lengths, self.dilated_ratios,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return attn.reshape(bsz, seq_len, self.embed_dim)

    def project_out(self, attn: Tensor) -> Tensor:
        return self.out_proj(self.inner_attn_ln(attn))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        return self.project_out(self.attend(F.linear(x, *self.qkv_weight())))


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: list[int],
    dilated_ratios: list[int],
    dropout_p: float = 0.0,
) -> Tensor:
    """LongNet dilated attention on projected `q, k, v` of shape [B, L, H, d]; returns [B, L, H, d].

    Runs on strided views of the (end-padded) sequence when every branch allows it, which is the
    case for slide-length sequences and all of SlideChat's settings; otherwise gathers.
    """
    if _strided_length(q.shape[1], segment_lengths, dilated_ratios) is None:
        return dilated_attention_gather(q, k, v, segment_lengths, dilated_ratios, dropout_p)
    return dilated_attention_strided(q, k, v, segment_lengths, dilated_ratios, dropout_p)


def dilated_attention_strided(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: list[int],
    dilated_ratios: list[int],
    dropout_p: float = 0.0,
) -> Tensor:
    """Dilated attention without gathers: q/k/v [B, L, H, d] are zero-padded at the end once and
    each branch's sparse segments are strided views of them (see `_strided_length`)."""
    bsz, seq_len = q.shape[:2]
    padded = _strided_length(seq_len, segment_lengths, dilated_ratios)
    if padded is None:
        raise ValueError(f"length {seq_len} needs padding inside segments; use dilated_attention_gather")
    if padded > seq_len:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - seq_len)) for t in (q, k, v))
    outs = [
        _dilated_attention_strided(q[i], k[i], v[i], seq_len, segment_lengths, dilated_ratios, dropout_p)
        for i in range(bsz)
    ]
    out = torch.stack(outs) if bsz > 1 else outs[0].unsqueeze(0)
    return out[:, :seq_len]


def _strided_length(seq_len: int, segment_lengths: list[int], dilated_ratios: list[int]) -> int | None:
    """Padded length on which every branch's sparse segments are plain strided views, or None.

    A branch whose segment length is a multiple of its ratio (or that has a single segment) only
    needs the sequence zero-padded at the end, so the longest such padding serves all branches.
    None when some branch needs padding inside its segments, or the padding would more than double
    the sequence (short sequences in a batch, as `context: per_patch` makes them).
    """
    length = seq_len
    for seg_len, ratio in zip(segment_lengths, dilated_ratios):
        n_seg, slots = _branch_layout(seq_len, seg_len, ratio)
        if n_seg > 1 and min(seg_len, seq_len) % ratio:
            return None
        length = max(length, n_seg * slots * ratio)
    return length if length <= 2 * seq_len else None


def _head_groups(t: Tensor, n_seg: int, ratio: int, num_heads: int) -> list[Tensor]:
    """Views [n_seg, slots, heads of group, ...] of `t` [n_seg * slots * ratio, H, ...], one per head group.

    Group `g` is the heads `j` with `j // ceil(H / ratio) == g`; in every segment it owns the
    positions `g, g + ratio, g + 2 ratio, ...`. With `ratio >= H` every head is its own group and
    the H groups are one diagonal view.
    """
    per_group = -(-num_heads // ratio)
    x = t.view(n_seg, -1, ratio, num_heads, *t.shape[2:])
    if per_group == 1:
        return [x[:, :, :num_heads].diagonal(dim1=2, dim2=3).movedim(-1, 2)]
    return [x[:, :, g, g * per_group : (g + 1) * per_group] for g in range(-(-num_heads // per_group))]


def _dilated_attention_strided(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_len: int,
    segment_lengths: list[int],
    dilated_ratios: list[int],
    dropout_p: float,
) -> Tensor:
    """Dilated attention of one sequence of `seq_len`, q/k/v [L', H, d] zero-padded to the strided length L'.

    Every head group of every branch runs the fused kernel directly on a strided view (no gather),
    and its output is added into the matching view of the result (no scatter).
    """
    h = q.shape[1]
    groups = []  # (branch, group, n_seg, ratio, length used, output)
    lse_all = torch.full((len(segment_lengths), q.shape[0], h), _LSE_MASK, dtype=torch.float32, device=q.device)
    for b, (seg_len, ratio) in enumerate(zip(segment_lengths, dilated_ratios)):
        n_seg, slots = _branch_layout(seq_len, seg_len, ratio)
        used = n_seg * slots * ratio
        views = zip(*(_head_groups(t[:used], n_seg, ratio, h) for t in (q, k, v)))
        lse_views = _head_groups(lse_all[b, :used], n_seg, ratio, h)
        for g, (qg, kg, vg) in enumerate(views):
            o, lse = attention_with_lse(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), dropout_p)
            lse = lse.transpose(1, 2).float()
            # as in the original: a normaliser of exactly 0 is treated like "not covered"
            lse_views[g].copy_(lse.detach().masked_fill(lse == 0, _LSE_MASK))
            groups.append((b, g, n_seg, ratio, used, o.transpose(1, 2)))
    # combine branches by their softmax normalisers; no gradient through the weights (as original)
    with torch.no_grad():
        weights = torch.softmax(lse_all, dim=0)
    out = q.new_zeros(q.shape)
    for b, g, n_seg, ratio, used, o in groups:
        w = _head_groups(weights[b, :used], n_seg, ratio, h)[g]
        _head_groups(out[:used], n_seg, ratio, h)[g].addcmul_(o, w.unsqueeze(-1).to(o.dtype))
    return out


def dilated_attention_gather(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: list[int],
    dilated_ratios: list[int],
    dropout_p: float = 0.0,
) -> Tensor:
    """Dilated attention by gathering: the general path, for layouts `dilated_attention_strided` can't view.

    Each branch gathers its sparse segments with one flat index (an extra zero row stands for the
    padding the original adds), runs fused attention on them, and only the covered (position,
    head) pairs are scattered back, so the work per branch is proportional to L / ratio.
    """
    bsz, seq_len, h, hd = q.shape
    rows = (seq_len + 1) * h  # flat (position, head) rows; the last H rows are the zero row
    zero = q.new_zeros(bsz, 1, h, hd)
    qf, kf, vf = (torch.cat([t, zero], dim=1).view(bsz, rows, hd) for t in (q, k, v))
    heads = torch.arange(h, device=q.device)
    branches: list[tuple[Tensor | None, Tensor]] = []  # (flat index or None for a dense branch, output)
    dense_lses: list[Tensor] = []
    for seg_len, ratio in zip(segment_lengths, dilated_ratios):
        if ratio == 1 and seq_len % min(seg_len, seq_len) == 0:
            # dense segments with no padding: the gather is a reshape, the scatter a plain add
            seg = min(seg_len, seq_len)
            n_seg = seq_len // seg

            def segments(t: Tensor) -> Tensor:
                return t.view(bsz, n_seg, seg, h, hd).transpose(2, 3).reshape(bsz * n_seg, h, seg, hd)

            o, lse = attention_with_lse(segments(q), segments(k), segments(v), dropout_p)
            o = o.view(bsz, n_seg, h, seg, hd).transpose(2, 3).reshape(bsz, seq_len * h, hd)
            lse = lse.reshape(bsz, n_seg, h, seg).transpose(2, 3).reshape(bsz, seq_len * h).float()
            lse = lse.masked_fill(lse == 0, _LSE_MASK)
            dense = torch.full((bsz, rows), _LSE_MASK, dtype=torch.float32, device=q.device)
            dense[:, : seq_len * h] = lse.detach()
            dense_lses.append(dense)
            branches.append((None, o))
            continue
        idx = _branch_index(seq_len, seg_len, ratio, h, q.device)  # [n, m, H]
        n_seg, slots, _ = idx.shape
        # (segment, head, slot) order: the gathered rows are already the [B*n, H, m, d] layout the
        # kernel wants, and its outputs map back without a transpose copy
        flat = (idx * h + heads).permute(0, 2, 1).reshape(-1)

        def gather(t: Tensor) -> Tensor:
            return t.index_select(1, flat).view(bsz * n_seg, h, slots, hd)

        o, lse = attention_with_lse(gather(qf), gather(kf), gather(vf), dropout_p)
        o = o.reshape(bsz, n_seg * h * slots, hd)
        lse = lse.reshape(bsz, n_seg * h * slots).float()
        # as in the original: a normaliser of exactly 0 is treated like "not covered"
        lse = lse.masked_fill(lse == 0, _LSE_MASK)
        dense = torch.full((bsz, rows), _LSE_MASK, dtype=torch.float32, device=q.device)
        dense_lses.append(dense.index_copy_(1, flat, lse.detach()))
        branches.append((flat, o))

    # combine branches by their softmax normalisers; no gradient through the weights (as original)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(dense_lses, dim=0), dim=0)
    out = q.new_zeros(bsz, rows, hd)
    for (flat, o), w in zip(branches, weights):
        if flat is None:
            out[:, : seq_len * h] += o * w[:, : seq_len * h].unsqueeze(-1).to(o.dtype)
        else:
            out.index_add_(1, flat, o * w.index_select(1, flat).unsqueeze(-1).to(o.dtype))
    return out[:, : seq_len * h].view(bsz, seq_len, h, hd)


# ----------------------------------------------------------------------------------------------
# encoder


class FeedForwardNetwork(nn.Module):
    """fc1 -> GELU (fp32) -> sub-LN -> fc2 -> dropout, as torchscale's FFN with subln."""

    def __init__(self, cfg: LongNetConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = F.gelu(x.float()).type_as(x)
        x = self.ffn_layernorm(x)
        return self.dropout(self.fc2(x))


TOKEN_CHUNK = 2048  # tokens per chunk for per-token work at inference: 2048 x 1024 fp32 = 8 MiB


def by_token_chunks(fn: Callable[..., Tensor], *xs: Tensor, out_dim: int, chunk: int | None = None) -> Tensor:
    """`fn(*xs, out=...)` for a per-token `fn` of tensors [..., D_i] with the same leading dims, in
    chunks of tokens; `fn` writes each chunk's [tokens, out_dim] result into `out`."""
    chunk = chunk or TOKEN_CHUNK
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    n = flat[0].shape[0]
    out = flat[0].new_empty(n, out_dim)
    for start in range(0, n, chunk):
        fn(*(x[start : start + chunk] for x in flat), out=out[start : start + chunk])
    return out.view(*xs[0].shape[:-1], out_dim)


class LongNetEncoderLayer(nn.Module):
    def __init__(self, cfg: LongNetConfig, depth: int) -> None:
        super().__init__()
        self.self_attn = DilatedAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        # per-layer rate: linspace(0, rate, layers)[depth], as torchscale
        rate = cfg.drop_path_rate * depth / (cfg.num_layers - 1) if cfg.num_layers > 1 else 0.0
        self.drop_path = DropPath(rate)  # timm's, which torchscale's DropPath calls
        self.ffn = FeedForwardNetwork(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            residual = x
            x = self.self_attn(self.self_attn_layer_norm(x))
            x = residual + self.drop_path(self.dropout(x))
            residual = x
            x = self.ffn(self.final_layer_norm(x))
            return residual + self.drop_path(x)
        # CPU inference: only the attention needs the whole sequence; everything before and after
        # it is per token and runs over chunks of tokens that stay in cache (the FFN block alone
        # is ~25% faster so, and its [L, ffn_dim] intermediate is never whole)
        weight, bias = self.self_attn.qkv_weight()

        def project(t: Tensor, out: Tensor) -> Tensor:
            return torch.addmm(bias, self.self_attn_layer_norm(t), weight.t(), out=out)

        qkv = by_token_chunks(project, x, out_dim=weight.shape[0])
        return by_token_chunks(self._after_attention, self.self_attn.attend(qkv), x, out_dim=x.shape[-1])

    def _after_attention(self, attn: Tensor, residual: Tensor, out: Tensor) -> Tensor:
        x = residual + self.self_attn.project_out(attn)
        return torch.add(x, self.ffn(self.final_layer_norm(x)), out=out)


class LongNetEncoder(nn.Module):
    """LongNet encoder over token embeddings [B, L, D] (batch first), output [B, L, D].

    The state-dict keys (`layers.{i}.self_attn.q_proj.weight`, ..., `layer_norm.weight`) are
    those of the torchscale `LongNetEncoder` SlideChat checkpoints store under `LongNet_encoder.`.
    """

    def __init__(self, cfg: LongNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([LongNetEncoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.gradient_checkpointing = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torchscale's sub-LN initialisation: scale fc1/fc2/out_proj/v_proj (weights and biases)
        # by sqrt(log(2 * layers)) after the default nn.Linear init.
        scale = math.sqrt(math.log(self.config.num_layers * 2)) if self.config.num_layers > 0 else 1.0
        with torch.no_grad():
            for name, p in self.named_parameters():
                if any(s in name for s in ("fc1", "fc2", "out_proj", "v_proj")):
                    p.mul_(scale)

    def forward(self, token_embeddings: Tensor) -> Tensor:
        x = self.dropout(token_embeddings)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.layer_norm(x)
