"""Routed-expert compute for MoE layers with dynamic expert skipping (MoDES).

One entry point, `moe_experts`, takes a fixed [T, K] table of (expert id, routing weight) per token, where a
skipped (token, slot) pair carries the id SKIP. Every shape depends on T and K only, never on how many slots
were skipped, so a compiled graph (and a CUDA graph) survives any skip pattern. Skipped pairs are never
multiplied, and an expert that no kept pair selects is never read.

Paths (see shared/spec/kernels.md sections 3 and 7):
  loop     per-(token, slot) fp32 loop with host syncs: the test oracle and a debugging aid
  experts  per-expert loop over the experts some kept pair selects (one dense matmul each); host syncs, so eager
           only, and on a CPU the fastest for every T: no sort, gather or weight copy
  grouped  prefill: sort pairs by expert, skipped pairs last, two grouped matmuls over the kept rows
  gather   decode (gpt-fast style): gather each slot's expert weights, batched matmul
  triton   decode on CUDA: one program per (slot, tile) reads the slot's expert id and reads no weight on SKIP
  auto     eager on CPU: experts; otherwise the decode path when T * K <= DECODE_MAX_SLOTS, else grouped

Legend: T tokens, K slots per token, E experts, H hidden size, I expert intermediate size, S = T * K slots.
No model imports here; compile calls and Inductor flags belong to the entry scripts.
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
    HAS_TRITON = hasattr(torch.library, "triton_op")  # torch >= 2.6 keeps a Triton kernel inside a compiled graph
except ImportError:
    HAS_TRITON = False

SKIP = -1                # expert id of a skipped (token, slot) pair; the project-wide constant
DECODE_MAX_SLOTS = 64    # auto: T * K at or below this takes the decode path (tune per GPU, transformers saw 2^6-2^9)
PATHS = ("auto", "loop", "experts", "grouped", "gather", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_CPU_GROUPED_MM = torch.__version__ >= "2.9"  # grouped_mm has no CPU kernel before 2.9
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # lets the triton path run on CPU tensors in tests


def moe_experts(x: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor, *,
                shared: tuple[Tensor, Tensor] | None = None, path: str = "auto") -> Tensor:
    """sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) over kept slots (+ shared MLP) -> [T, H], x's dtype.

    x [T, H]; w_gate_up [E, 2I, H] (gate rows first); w_down [E, H, I]; ids [T, K] int, SKIP where skipped;
    weights [T, K] fp32 final mixing coefficients, ignored (may be NaN) where skipped; shared: optional
    (w_gate_up [2Is, H], w_down [H, Is]) MLP added unweighted for every token. Only path="loop" range-checks
    the values of ids: elsewhere that would cost a host sync.
    """
    _check_inputs(x, w_gate_up, w_down, ids, weights, shared, path)
    T, H = x.shape
    K = ids.shape[1]
    if path == "auto" and x.device.type == "cpu" and not torch.compiler.is_compiling():
        path = "experts"  # measured with bench.py on 2 cores: faster than grouped (prefill) and gather (decode)
    elif path == "auto":
        decode = "triton" if x.is_cuda and HAS_TRITON else "gather"
        path = decode if T * K <= DECODE_MAX_SLOTS else "grouped"
    if path == "grouped" and not _grouped_mm_usable(x, w_down.shape[2]):
        # grouped_mm wants bf16/fp16/fp32 with 16-byte row strides (H and I multiples of 8 in bf16, 4 in fp32) and
        # a CPU kernel (torch >= 2.9); otherwise the gather path, which has no layout rules, does the same job
        # at the price of one weight copy per slot (fine for the toy sizes that end up here).
        path = "gather"
    ids = ids.long()
    if path == "loop":
        out = _loop_experts(x, w_gate_up, w_down, ids, weights)
    elif path == "experts":
        out = _per_expert(x, w_gate_up, w_down, ids, weights)
    elif path == "grouped":
        out = _grouped_experts(x, w_gate_up, w_down, ids, weights)
    elif path == "gather":
        out = _gather_experts(x, w_gate_up, w_down, ids, weights)
    else:
        y = torch.ops.moe_kernels.slot_experts(x.contiguous(), w_gate_up, w_down, ids.contiguous(),
                                               weights.contiguous())  # [S, H] fp32, zero rows where skipped
        out = y.view(T, K, H).sum(1)
    if shared is not None:
        sx = x.float() if path == "loop" else x
        out = out + _dense_mlp(sx, shared[0].to(sx.dtype), shared[1].to(sx.dtype)).float()
    return out.to(x.dtype)


def _check_inputs(x, w_gate_up, w_down, ids, weights, shared, path):
    def fail(msg):
        raise ValueError(msg)
    if path not in PATHS:
        fail(f"path must be one of {PATHS}, got {path!r}")
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        fail(f"x must be a float32/bfloat16/float16 tensor [T, H], got {x.dtype} {tuple(x.shape)}")
    T, H = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        fail(f"w_gate_up must be [E, 2I, {H}], got {tuple(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if w_down.shape != (E, H, I):
        fail(f"w_down must be {(E, H, I)} to match w_gate_up, got {tuple(w_down.shape)}")
    if ids.dim() != 2 or ids.shape[0] != T or ids.dtype not in (torch.int32, torch.int64):
        fail(f"ids must be an int32/int64 tensor [{T}, K], got {ids.dtype} {tuple(ids.shape)}")
    if weights.shape != ids.shape or weights.dtype != torch.float32:
        fail(f"weights must be a float32 tensor {tuple(ids.shape)}, got {weights.dtype} {tuple(weights.shape)}")
    tensors = {"w_gate_up": w_gate_up, "w_down": w_down, "ids": ids, "weights": weights}
    if shared is not None:
        if len(shared) != 2 or shared[0].dim() != 2 or shared[0].shape[0] % 2:
            fail("shared must be (w_gate_up [2Is, H], w_down [H, Is])")
        Is = shared[0].shape[0] // 2
        if shared[0].shape[1] != H or shared[1].shape != (H, Is):
            fail(f"shared must be (w_gate_up [2Is, {H}], w_down [{H}, Is]), got "
                 f"{tuple(shared[0].shape)} and {tuple(shared[1].shape)}")
        tensors |= {"shared[0]": shared[0], "shared[1]": shared[1]}
    for name, t in tensors.items():
        if t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}")
        if name.startswith(("w_", "shared")) and t.dtype != x.dtype:
            fail(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    for name in ("w_gate_up", "w_down"):
        if not tensors[name].is_contiguous():
            fail(f"{name} must be contiguous")
    if path == "triton" and not (HAS_TRITON and (x.is_cuda or _TRITON_INTERPRET)):
        fail("path='triton' needs CUDA tensors and an importable triton")


def _grouped_mm_usable(x: Tensor, I: int) -> bool:
    H, size = x.shape[1], x.element_size()
    return (_grouped_mm is not None and (x.is_cuda or _CPU_GROUPED_MM)
            and (H * size) % 16 == 0 and (I * size) % 16 == 0)


def _dense_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # [T, I], [T, I]
    return F.linear(F.silu(gate) * up, w_down)          # [T, H]


def _loop_experts(x, w_gate_up, w_down, ids, weights) -> Tensor:
    T, H = x.shape
    E, K = w_gate_up.shape[0], ids.shape[1]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e == SKIP:
                continue
            if not 0 <= e < E:
                raise ValueError(f"ids[{t}, {k}] = {e} is neither SKIP nor an expert id in [0, {E})")
            y = _dense_mlp(x[t].float(), w_gate_up[e].float(), w_down[e].float())  # [H]
            out[t] += weights[t, k] * y
    return out


def _per_expert(x, w_gate_up, w_down, ids, weights) -> Tensor:
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():  # sorted, so SKIP (-1) comes first
        if e == SKIP:
            continue
        tok, slot = torch.where(ids == e)
        y = _dense_mlp(x[tok], w_gate_up[e], w_down[e])  # [n, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out


def _grouped_experts(x, w_gate_up, w_down, ids, weights) -> Tensor:
    T, H = x.shape
    E, I, K = w_gate_up.shape[0], w_down.shape[2], ids.shape[1]
    key = torch.where(ids == SKIP, E, ids).flatten()                        # [S], skipped pairs sort last
    key_sorted, perm = torch.sort(key, stable=True)                         # [S], [S]
    # end offset of each expert's run of rows; empty experts get empty groups, so their weights are never read
    offs = torch.searchsorted(key_sorted, torch.arange(E, device=x.device), right=True, out_int32=True)  # [E]
    xs = x.index_select(0, perm // K)                                        # [S, H], rows past offs[-1] are skipped
    grouped_mm = _grouped_mm if x.dtype == torch.bfloat16 else torch.ops.moe_kernels.grouped_mm
    h = grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)               # [S, 2I]
    act = F.silu(h[:, :I]) * h[:, I:]                                        # [S, I]
    y = grouped_mm(act, w_down.transpose(-2, -1), offs=offs)                 # [S, H]
    y = _masked_combine(y, key_sorted < E, weights.flatten()[perm])          # [S, H] fp32
    y = torch.empty_like(y).index_copy_(0, perm, y)                          # [S, H] back in (token, slot) order
    return y.view(T, K, H).sum(1)                                            # [T, H], fixed order: deterministic


# torch 2.13's meta function for _grouped_mm admits only bf16, though the CPU kernel also runs fp32/fp16; an opaque
# custom op carries those dtypes through torch.compile(fullgraph=True) (on CUDA only bf16 avoids a host sync).
@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return _grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


def _masked_combine(y: Tensor, keep: Tensor, w: Tensor) -> Tensor:
    # where, not "* 0": grouped_mm leaves rows past offs[-1] uninitialised, and NaN * 0 is NaN
    return torch.where(keep[:, None], y.float() * w[:, None], 0.0)


def _redirect_skipped(ids: Tensor, E: int) -> Tensor:
    """Point each skipped slot at an expert its token keeps (else one the batch keeps), so a gather reads no new expert.

    Only when the whole batch keeps nothing does a slot read an expert (E - 1) nobody selected; its result is masked.
    """
    key = torch.where(ids == SKIP, E, ids)                                   # [T, K]
    first = key.min(dim=1, keepdim=True).values                              # [T, 1], E where the token keeps none
    first = torch.where(first == E, key.min(), first).clamp(max=E - 1)       # [T, 1]
    return torch.where(ids == SKIP, first, ids)                              # [T, K]


def _gather_experts(x, w_gate_up, w_down, ids, weights) -> Tensor:
    E, I = w_gate_up.shape[0], w_down.shape[2]
    ids_r = _redirect_skipped(ids, E)                                        # [T, K]
    # under Inductor with coordinate_descent_tuning the gathers fuse into the M=1 reductions (gpt-fast)
    h = torch.einsum("th,tkjh->tkj", x, w_gate_up[ids_r])                    # [T, K, 2I]
    act = F.silu(h[..., :I]) * h[..., I:]                                    # [T, K, I]
    y = torch.einsum("tki,tkhi->tkh", act, w_down[ids_r])                    # [T, K, H]
    keep = ids != SKIP                                                       # [T, K]
    return torch.where(keep[..., None], y.float() * weights[..., None], 0.0).sum(1)  # [T, H] fp32


if HAS_TRITON:
    @triton.jit
    def _slot_gate_up_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, K, H, I,
                             BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        # program (s, n): act[s, n-tile] = silu(gate) * up of slot s's expert for token s // K
        s = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + s)
        h_end = tl.where(e == -1, 0, H)  # SKIP (-1): zero iterations, so not one weight byte is read
        w_gate = w_ptr + e * 2 * I * H + n[:, None] * H
        x_row = x_ptr + (s // K) * H
        gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for h0 in range(0, h_end, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            xv = tl.load(x_row + h, mask=h < H, other=0.0).to(tl.float32)
            mask = (n[:, None] < I) & (h[None, :] < H)
            gate += tl.sum(tl.load(w_gate + h[None, :], mask=mask, other=0.0).to(tl.float32) * xv[None, :], axis=1)
            up += tl.sum(tl.load(w_gate + I * H + h[None, :], mask=mask, other=0.0).to(tl.float32) * xv[None, :],
                         axis=1)
        tl.store(act_ptr + s * I + n, gate * tl.sigmoid(gate) * up, mask=n < I)

    @triton.jit
    def _slot_down_kernel(act_ptr, w_ptr, ids_ptr, rw_ptr, y_ptr, H, I,
                          BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
        # program (s, n): y[s, n-tile] = weight[s] * down(act[s]), zeros for a skipped slot
        s = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + s)
        i_end = tl.where(e == -1, 0, I)  # SKIP: as above
        w_row = w_ptr + e * H * I + n[:, None] * I
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i0 in range(0, i_end, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            a = tl.load(act_ptr + s * I + i, mask=i < I, other=0.0)
            mask = (n[:, None] < H) & (i[None, :] < I)
            acc += tl.sum(tl.load(w_row + i[None, :], mask=mask, other=0.0).to(tl.float32) * a[None, :], axis=1)
        y = tl.where(e == -1, 0.0, acc * tl.load(rw_ptr + s))  # the weight of a skipped slot may be NaN
        tl.store(y_ptr + s * H + n, y, mask=n < H)

    @torch.library.triton_op("moe_kernels::slot_experts", mutates_args={})
    def _slot_experts(x: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        T, H = x.shape
        I, K = w_down.shape[2], ids.shape[1]
        act = torch.empty(T * K, I, dtype=torch.float32, device=x.device)   # [S, I]
        y = torch.empty(T * K, H, dtype=torch.float32, device=x.device)     # [S, H]
        # tiles after vLLM's M=1 configs for H100/H200 (BLOCK_N 32-64, BLOCK_K 64-128); untuned
        torch.library.wrap_triton(_slot_gate_up_kernel)[(T * K, triton.cdiv(I, 32))](
            x, w_gate_up, ids, act, K, H, I, BLOCK_N=32, BLOCK_H=128)
        torch.library.wrap_triton(_slot_down_kernel)[(T * K, triton.cdiv(H, 32))](
            act, w_down, ids, weights, y, H, I, BLOCK_N=32, BLOCK_I=128)
        return y
