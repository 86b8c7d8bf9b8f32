"""Triton RMSNorm (plain and fused with the residual add) and rotary embedding (same contract as `norm_ref`).

One program per token row; everything is computed in fp32 and rounded where the HF reference rounds
(the normalised row is cast to the model dtype before the weight multiply)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, hidden, eps,
    stride_x, stride_r, stride_o, stride_s,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        x = x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = w * (xf * inv).to(x.dtype)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, pos_ptr, cos_sin_ptr, heads, half, stride_xt, stride_xh, stride_ot, stride_oh, stride_cs,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < half
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_h[:, None] < heads) & d_mask[None, :]
    src = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, "x: [T, hidden] with unit inner stride"
    assert weight.shape == (x.shape[1],) and weight.is_contiguous(), "weight: [hidden]"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight, computed in fp32 and returned in the dtype of weight · x."""
    _check_rows(x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x, x, weight, out, out, x.shape[1], eps, x.stride(0), 0, out.stride(0), 0,
            BLOCK=triton.next_power_of_2(x.shape[1]), ADD=False, num_warps=8,
        )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    _check_rows(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1, "residual like x"
    summed = torch.empty_like(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, out, summed, x.shape[1], eps, x.stride(0), residual.stride(0), out.stride(0),
            summed.stride(0), BLOCK=triton.next_power_of_2(x.shape[1]), ADD=True, num_warps=8,
        )
    return out, summed


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    num_tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and dim % 2 == 0, "x: [T, heads, head_dim] with unit inner stride, even head_dim"
    out = torch.empty_like(x)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            x, out, positions, cos_sin, heads, dim // 2, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            cos_sin.stride(0), BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim // 2),
            num_warps=4,
        )
    return out


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by their positions; cos_sin[pos] = (cos[D/2], sin[D/2]) fp32."""
    assert cos_sin.dim() == 2 and cos_sin.shape[1] == q.shape[2] and cos_sin.stride(1) == 1, "cos_sin: [P, D]"
    assert positions.shape == (q.shape[0],) and k.shape[0] == q.shape[0], "positions: [T]"
    return _rotate(q, positions, cos_sin), _rotate(k, positions, cos_sin)
