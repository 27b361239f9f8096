"""Plain-PyTorch gated delta rule: the ground truth every fast kernel is tested against.

Legend: B batch, T tokens, H heads, K key dim, V value dim, N packed sequences, C chunk size.

Recurrence per head (state S_KV, float32 unless the inputs are float64):
    S_t = S_{t-1} * exp(g_t)                       (decay before the delta update)
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T   (delta rule)
    o_t = S_t^T q_t
q and k are L2-normalised per head (x / sqrt(sum x^2 + 1e-6)) when `use_qk_l2norm` is set, and q is
scaled by K^-0.5. A token with g = 0 and beta = 0 leaves the state untouched: that is how padding is
masked (see `mask_padding`).
"""
from __future__ import annotations

import torch

L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def mask_padding(
    g_BTH: torch.Tensor, beta_BTH: torch.Tensor, mask_BT: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero decay and write strength on padding so pad tokens cannot touch the state."""
    if mask_BT is None:
        return g_BTH, beta_BTH
    keep = mask_BT.to(torch.bool)[..., None]
    return g_BTH.masked_fill(~keep, 0.0), beta_BTH.masked_fill(~keep, 0.0)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q * scale, k, v, g, beta, dtype


def _split_packed(cu_seqlens: torch.Tensor | None, T: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _check(q, k, v, g, beta, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(
            f"gated delta rule shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"g {tuple(g.shape)}, beta {tuple(beta.shape)}; expected q,k [B,T,H,K], v [B,T,H,V], g,beta [B,T,H]"
        )
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [{N}, {H}, {K}, {v.shape[-1]}], got {tuple(initial_state.shape)}")


def recurrent_gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence. Returns (o [B,T,H,V] in v's dtype, final state [N,H,K,V] or None)."""
    _check(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state, cu_seqlens)
    out_dtype = v_BTHV.dtype
    q, k, v, g, beta, dtype = _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, scale, use_qk_l2norm)
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=dtype, device=q.device)
    finals = []
    rows = range(B) if cu_seqlens is None else [0]
    for b in rows:
        for n, (start, end) in enumerate(_split_packed(cu_seqlens, T)):
            idx = b if cu_seqlens is None else n
            S = torch.zeros(H, K, V, dtype=dtype, device=q.device)
            if initial_state is not None:
                S = initial_state[idx].to(dtype).clone()
            for t in range(start, end):
                S = S * g[b, t].exp()[:, None, None]
                err = v[b, t] - torch.einsum("hk,hkv->hv", k[b, t], S)
                S = S + torch.einsum("hk,hv->hkv", k[b, t], err * beta[b, t][:, None])
                o[b, t] = torch.einsum("hk,hkv->hv", q[b, t], S)
            finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final


def chunk_gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) form: same function as the recurrence, O(T/C) sequential steps of matmuls."""
    _check(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state, cu_seqlens)
    out_dtype = v_BTHV.dtype
    q, k, v, g, beta, dtype = _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, scale, use_qk_l2norm)
    B, T, H, K = q.shape
    if cu_seqlens is None:
        o, final = _chunk_batch(q, k, v, g, beta, initial_state, chunk_size)
        return o.to(out_dtype), (final if output_final_state else None)
    # Packed rows hold many short sequences (a training row: dozens of samples). Sequences with the same
    # number of chunks run as one padded batch: trailing padding (k = 0, g = 0, beta = 0) is inert, so
    # this is the per-sequence computation with a handful of launches instead of one set per sequence.
    spans = _split_packed(cu_seqlens, T)
    V = v.shape[-1]
    o = q.new_zeros(1, T, H, V)
    final = q.new_zeros(len(spans), H, K, V)
    groups: dict[int, list[int]] = {}
    for n, (start, end) in enumerate(spans):
        groups.setdefault(-(-(end - start) // chunk_size), []).append(n)
    for n_chunks, members in groups.items():
        L = n_chunks * chunk_size
        idx_NL = torch.tensor([[min(spans[n][0] + t, T) for t in range(L)] for n in members], device=q.device)
        real_NL = idx_NL < torch.tensor([spans[n][1] for n in members], device=q.device)[:, None]
        idx_NL = idx_NL.clamp(max=T - 1)

        def batch(x):  # [1, T, H, *] -> [N, L, H, *], zero past each sequence's end
            xb = x[0][idx_NL]
            return xb * real_NL.view(*real_NL.shape, *([1] * (xb.ndim - 2))).to(xb.dtype)

        init = None if initial_state is None else initial_state[members]
        o_n, f_n = _chunk_batch(batch(q), batch(k), batch(v), batch(g), batch(beta), init, chunk_size)
        o = o.index_put((torch.zeros_like(idx_NL[real_NL]), idx_NL[real_NL]), o_n[real_NL])
        final = final.index_copy(0, torch.tensor(members, device=q.device), f_n)
    return o.to(out_dtype), (final if output_final_state else None)


def _chunk_batch(q, k, v, g, beta, initial_state, C):
    """q,k [B,T,H,K], v [B,T,H,V], g,beta [B,T,H], already normalised/scaled, float32/64."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, device = q.dtype, q.device
    pad = (-T) % C
    # Padding with g = 0, beta = 0, k = 0 is inert: it neither decays nor writes the state.
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    n = (T + pad) // C
    # -> [B, H, n, C, *]
    q, k, v = (x.transpose(1, 2).reshape(B, H, n, C, -1) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(B, H, n, C) for x in (g, beta))

    G = g.cumsum(-1)  # log decay from the chunk start to each token, inclusive
    tril = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    strict = tril.logical_and(~torch.eye(C, dtype=torch.bool, device=device))
    # decay_ij = exp(G_i - G_j) for j <= i; masked before exp so it never overflows
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~tril, float("-inf")).exp()

    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    # Solve (I + L) u = rhs with L_ij = beta_i k_i.k_j decay_ij (i > j): the WY form of C delta steps.
    L = (k_beta @ k.transpose(-1, -2)) * decay
    L = L.masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=dtype, device=device)
    Tinv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L).contiguous(), upper=False, unitriangular=True)
    u = Tinv @ v_beta  # pseudo-values if the chunk started from a zero state
    w = Tinv @ (k_beta * G[..., None].exp())  # how much of the carried state each write removes

    S = torch.zeros(B, H, K, V, dtype=dtype, device=device)
    if initial_state is not None:
        S = initial_state.to(dtype).clone()
    o = torch.empty(B, H, n, C, V, dtype=dtype, device=device)
    for c in range(n):
        qc, kc = q[:, :, c], k[:, :, c]
        v_new = u[:, :, c] - w[:, :, c] @ S
        intra = (qc @ kc.transpose(-1, -2)) * decay[:, :, c]
        o[:, :, c] = (qc * G[:, :, c, :, None].exp()) @ S + intra @ v_new
        g_last = G[:, :, c, -1]
        k_to_end = kc * (g_last[..., None] - G[:, :, c]).exp()[..., None]
        S = S * g_last.exp()[..., None, None] + k_to_end.transpose(-1, -2) @ v_new
    o = o.reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o, S
