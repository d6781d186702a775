"""Triton versions of the small per-token ops: KV store (alone or with rotary), (fused add +) RMSNorm, SiLU-mul.

The KV stores write 16-bit caches as they are and FP8 caches scaled (kernels/kv_cache.py).

Each program handles one token row; shapes and strides are checked by the
wrappers, which mirror the reference functions' signatures exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _to_cache(x, scale_ptr, cache_ptr, FP8: tl.constexpr):
    """x as the cache stores it: an FP8 cache holds round(x / scale) clamped to +-448
    (kernels/kv_cache.py::to_cache), a 16-bit one x itself."""
    if FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32) / tl.load(scale_ptr), -448.0), 448.0)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, ks_ptr, vs_ptr, stride_kt, stride_vt, stride_cs,
                     HD: tl.constexpr, HD_PAD: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        i = tl.arange(0, HD_PAD)
        ok = i < HD
        k = _to_cache(tl.load(k_ptr + t * stride_kt + i, mask=ok), ks_ptr, kc_ptr, FP8)
        v = _to_cache(tl.load(v_ptr + t * stride_vt + i, mask=ok), vs_ptr, vc_ptr, FP8)
        tl.store(kc_ptr + slot * stride_cs + i, k, mask=ok)
        tl.store(vc_ptr + slot * stride_cs + i, v, mask=ok)


def _fp8_scales(k_cache, k_scale, v_scale):
    """(FP8 flag, k scale, v scale) for the kernels: an FP8 cache without scales gets 1.0."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        return False, k_cache, k_cache  # unused pointers
    one = None if k_scale is not None and v_scale is not None else torch.ones((), device=k_cache.device)
    return True, (k_scale if k_scale is not None else one), (v_scale if v_scale is not None else one)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """k, v: [T, Hkv, D] (each row contiguous); caches [blocks, block_size, Hkv, D] contiguous;
    k_scale / v_scale: an FP8 cache's 0-d fp32 scales."""
    t, h, d = k.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV caches must be contiguous")
    if k.stride(2) != 1 or k.stride(1) != d or v.stride(2) != 1 or v.stride(1) != d:
        raise ValueError("k and v rows must be contiguous [Hkv, D]")
    fp8, ks, vs = _fp8_scales(k_cache, k_scale, v_scale)
    if k.dtype != k_cache.dtype and not fp8:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    hd = h * d
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, ks, vs, k.stride(0), v.stride(0), hd,
                           HD=hd, HD_PAD=triton.next_power_of_2(hd), FP8=fp8)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r, stride_o, stride_ro,
                     N: tl.constexpr, N_PAD: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, N_PAD)
    ok = i < N
    x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + i, mask=ok, other=0.0)
        tl.store(res_out_ptr + row * stride_ro + i, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    # As HF: normalise in fp32, cast to the input dtype, then scale.
    y = w * (xf * rstd).to(x.dtype)
    tl.store(out_ptr + row * stride_o + i, y, mask=ok)


def rms_norm(x, weight, eps: float, residual=None):
    """Returns norm(x) or, with residual, (norm(x + residual), x + residual)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = shape[-1]
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(out)
    else:
        r2, res_out = x2, out
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, eps, x2.stride(0), r2.stride(0), out.stride(0),
                                     res_out.stride(0), N=n, N_PAD=triton.next_power_of_2(n),
                                     HAS_RES=residual is not None)
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def silu_mul(g, u):
    """silu(g) * u in g's dtype, rounded as torch's silu then multiply round: silu in fp32,
    rounded, the product in fp32, rounded. The one definition: the decode GEMV's gated
    prologue (kernels/gemv_triton.py) calls it too, so both give the same bits."""
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < I
    g = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0)
    u = tl.load(x_ptr + row * stride_x + I + i, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + i, silu_mul(g, u), mask=ok)


def silu_and_mul(x):
    """x: [..., 2I] -> [..., I]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t, two_i = x2.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    block = 1024
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block)
    return out.reshape(*shape[:-1], inter)


@triton.jit
def _rotary_store_kv_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr, pos_ptr, slots_ptr, cache_ptr,
                            ks_ptr, vs_ptr,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_qot, stride_kot, stride_c, stride_cs,
                            HQ: tl.constexpr, HQ_PAD: tl.constexpr, HK: tl.constexpr, HK_PAD: tl.constexpr,
                            HALF: tl.constexpr, HALF_PAD: tl.constexpr, FP8: tl.constexpr):
    """One token: rotate q and k, write the rotated q and k out, and store the
    rotated k and the v in the cache slot (slot -1: padding, nothing stored)."""
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slots_ptr + t)
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    cos = tl.load(cache_ptr + pos * stride_c + j, mask=jm, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + j, mask=jm, other=0.0)
    # q: [HQ, 2*HALF]
    hq = tl.arange(0, HQ_PAD)
    mq = (hq < HQ)[:, None] & jm[None, :]
    qb = q_ptr + t * stride_qt + hq[:, None] * stride_qh + j[None, :]
    x1 = tl.load(qb, mask=mq, other=0.0)
    x2 = tl.load(qb + HALF, mask=mq, other=0.0)
    c = cos.to(x1.dtype)[None, :]
    s = sin.to(x1.dtype)[None, :]
    qo = qo_ptr + t * stride_qot + hq[:, None] * (2 * HALF) + j[None, :]
    tl.store(qo, x1 * c - x2 * s, mask=mq)
    tl.store(qo + HALF, x2 * c + x1 * s, mask=mq)
    # k and v: [HK, 2*HALF]
    hk = tl.arange(0, HK_PAD)
    mk = (hk < HK)[:, None] & jm[None, :]
    kb = k_ptr + t * stride_kt + hk[:, None] * stride_kh + j[None, :]
    y1 = tl.load(kb, mask=mk, other=0.0)
    y2 = tl.load(kb + HALF, mask=mk, other=0.0)
    r1 = y1 * c - y2 * s
    r2 = y2 * c + y1 * s
    ko = ko_ptr + t * stride_kot + hk[:, None] * (2 * HALF) + j[None, :]
    tl.store(ko, r1, mask=mk)
    tl.store(ko + HALF, r2, mask=mk)
    if slot >= 0:
        inner = hk[:, None] * (2 * HALF) + j[None, :]
        kc = kc_ptr + slot * stride_cs + inner
        tl.store(kc, _to_cache(r1, ks_ptr, kc_ptr, FP8), mask=mk)
        tl.store(kc + HALF, _to_cache(r2, ks_ptr, kc_ptr, FP8), mask=mk)
        vb = v_ptr + t * stride_vt + hk[:, None] * stride_vh + j[None, :]
        vc = vc_ptr + slot * stride_cs + inner
        tl.store(vc, _to_cache(tl.load(vb, mask=mk, other=0.0), vs_ptr, vc_ptr, FP8), mask=mk)
        tl.store(vc + HALF, _to_cache(tl.load(vb + HALF, mask=mk, other=0.0), vs_ptr, vc_ptr, FP8), mask=mk)


def rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """q: [T, Hq, D], k/v: [T, Hkv, D] -> rotated (q, k), both new contiguous
    tensors; rotated k and v are stored at slot_mapping in the caches."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if cos_sin_cache.shape[1] != d:
        raise ValueError(f"cos/sin cache width {cos_sin_cache.shape[1]} != head_dim {d}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV caches must be contiguous")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v must be contiguous in head_dim")
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    fp8, ks, vs = _fp8_scales(k_cache, k_scale, v_scale)
    if t:
        half = d // 2
        _rotary_store_kv_kernel[(t,)](
            q, k, v, q_out, k_out, k_cache, v_cache, positions, slot_mapping, cos_sin_cache, ks, vs,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), k_out.stride(0), cos_sin_cache.stride(0), hk * d,
            HQ=hq, HQ_PAD=triton.next_power_of_2(hq), HK=hk, HK_PAD=triton.next_power_of_2(hk),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), FP8=fp8)
    return q_out, k_out
