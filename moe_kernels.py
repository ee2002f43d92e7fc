"""Performance machinery: routed-expert compute that never touches a skipped (token, expert) pair, and the
compiled, CUDA-graph-captured decode step. model.py stays eager and readable; this file makes it fast.

Expert paths take a fixed [T, K] table of (expert id, routing weight) per token, where a skipped (token, slot) pair
carries a negative id (model.SKIP). Every shape depends on T and K only, never on how many slots were skipped, so
one compiled graph (and one CUDA graph) serves any skip pattern. Skipped pairs are never multiplied, and an expert
that no kept pair selects is never read. Every path also runs gpt-oss's experts: biases inside each kept expert (a
skipped slot adds none) and the clamped GLU (glu).

  grouped  prefill: sort pairs by expert, skipped pairs last, two grouped matmuls over the kept rows
  gather   decode (gpt-fast style): gather each slot's expert weights, batched matmul
  triton   decode on CUDA: one program per (slot, tile) reads the slot's expert id and reads no weight when skipped
  auto     (resolved by auto_path) model.py's readable loop on an eager CPU, where it is the fastest; otherwise
           the decode path when T * K <= DECODE_MAX_SLOTS, else grouped

DecodeStep compiles model.decode_step with fullgraph=True and on CUDA captures it once in a CUDA graph; skip
policies change only buffers, so the same graph serves every threshold (tau = 0 skips nothing).

Legend: T tokens, K slots per token, E experts, H hidden size, I expert intermediate size, S = T * K slots.
Named moe_kernels, not kernels: Hugging Face's `kernels` package (which transformers >= 5.25 imports) owns that
import name, and a kernels.py beside a script would shadow it. Nothing here imports the model; model.py calls in.
"""
import importlib.util
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# torch >= 2.6 keeps a Triton kernel inside a compiled graph. Triton is looked for here but imported by
# triton_kernels() on first use: importing it and registering the op pulls in torch._inductor, seconds that
# --help, argument errors and CPU runs never need.
HAS_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")

PATHS = ("grouped", "gather", "triton")
DECODE_MAX_SLOTS = 64  # auto: T * K at or below this takes the decode path (tune per GPU; transformers saw 2^6-2^9)
# Triton decode tiles: output rows per program and reduction chunk, per kernel (vLLM's M=1 configs for H100/H200
# use BLOCK_N 32-64, BLOCK_K 64-128). benchmarks/gpu.sh sweeps them; set them before the first compile.
TRITON_TILES = dict(gate_up=(32, 128), down=(32, 128), num_warps=4, num_stages=3)

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_CPU_GROUPED_MM = torch.__version__ >= "2.9"  # grouped_mm has no CPU kernel before 2.9
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # lets the triton path run on CPU tensors in tests


def auto_path(x: Tensor, ids: Tensor) -> str:
    """The path "auto" means for these tokens: "ref" (model.py's loop) on an eager CPU, measured there with bench.py
    as faster than grouped (prefill) and gather (decode); else by the number of slots T * K, a static int."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return "ref"
    if ids.numel() <= DECODE_MAX_SLOTS:
        if x.is_cuda and HAS_TRITON:
            if not torch.compiler.is_compiling():  # a compiled caller built them before tracing (DecodeStep)
                triton_kernels()
            return "triton"
        return "gather"
    return "grouped"


def check_path(path: str, device) -> None:
    """Refuse, once when a path is chosen, what cannot run on `device`."""
    if path not in PATHS:
        raise ValueError(f"expert path must be one of {PATHS}, got {path!r}")
    if path == "triton" and not (HAS_TRITON and (torch.device(device).type == "cuda" or _TRITON_INTERPRET)):
        raise ValueError("expert path triton needs a CUDA device and an importable triton (torch >= 2.6)")
    if path == "triton":
        triton_kernels()


def glu(h: Tensor, I: int, clamp=None) -> Tensor:
    """The experts' gated activation of h [..., 2I] (gate then up) -> [..., I]: silu(gate) * up, or with clamp =
    (alpha, limit) gpt-oss's clamped GLU: gate clamped above, up on both sides,
    (up + 1) * gate * sigmoid(alpha * gate)."""
    if clamp is None:
        return F.silu(h[..., :I]) * h[..., I:]
    alpha, limit = clamp
    gate, up = h[..., :I].clamp(max=limit), h[..., I:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def run(x: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor, path: str,
        b_gate_up: Tensor = None, b_down: Tensor = None, clamp=None) -> Tensor:
    """sum_k weights[t, k] * down_e(glu(gate_up_e(x_t))) over kept slots -> [T, H], x's dtype.

    x [T, H]; w_gate_up [E, 2I, H] (gate rows first), contiguous; w_down [E, H, I], contiguous; ids [T, K] int64,
    negative where skipped; weights [T, K] fp32 final mixing coefficients, ignored (may be NaN) where skipped.
    gpt-oss: biases b_gate_up [E, 2I] (gate then up) and b_down [E, H], contiguous, added inside each expert (a
    skipped slot adds neither), and clamp = (alpha, limit) for its GLU (see glu); every path takes them.
    Shapes, dtypes and devices are the model's and were checked when it was loaded, not here on the hot path."""
    T, H = x.shape
    K = ids.shape[1]
    if path == "grouped" and not _grouped_mm_usable(x, w_down.shape[2]):
        # grouped_mm wants bf16/fp16/fp32 with 16-byte row strides (H and I multiples of 8 in bf16, 4 in fp32) and
        # a CPU kernel (torch >= 2.9); otherwise the gather path, which has no layout rules, does the same job
        # at the price of one weight copy per slot (fine for the toy sizes that end up here)
        path = "gather"
    if path == "grouped":
        out = _grouped_experts(x, w_gate_up, w_down, ids, weights, b_gate_up, b_down, clamp)
    elif path == "gather":
        out = _gather_experts(x, w_gate_up, w_down, ids, weights, b_gate_up, b_down, clamp)
    else:
        if not torch.compiler.is_compiling():  # under torch.compile they were built before tracing
            triton_kernels()
        y = torch.ops.moe_kernels.slot_experts(  # [S, H] fp32, zero rows where skipped
            x.contiguous(), w_gate_up, w_down, ids.contiguous(), weights.contiguous(), b_gate_up, b_down, clamp)
        out = y.view(T, K, H).sum(1)
    return out.to(x.dtype)


def _grouped_mm_usable(x: Tensor, I: int) -> bool:
    H, size = x.shape[1], x.element_size()
    return (_grouped_mm is not None and (x.is_cuda or _CPU_GROUPED_MM)
            and (H * size) % 16 == 0 and (I * size) % 16 == 0)


def _grouped_experts(x, w_gate_up, w_down, ids, weights, b_gate_up=None, b_down=None, clamp=None) -> Tensor:
    T, H = x.shape
    E, I, K = w_gate_up.shape[0], w_down.shape[2], ids.shape[1]
    key = torch.where(ids < 0, E, ids).flatten()  # [S], skipped pairs sort last
    key_sorted, perm = torch.sort(key, stable=True)  # [S], [S]
    # end offset of each expert's run of rows; empty experts get empty groups, so their weights are never read
    offs = torch.searchsorted(key_sorted, torch.arange(E, device=x.device), right=True, out_int32=True)  # [E]
    xs = x.index_select(0, perm // K)  # [S, H], rows past offs[-1] are skipped
    grouped_mm = _grouped_mm if x.dtype == torch.bfloat16 else torch.ops.moe_kernels.grouped_mm
    h = grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)  # [S, 2I]
    row_expert = key_sorted.clamp(max=E - 1)  # [S]; skipped rows read some bias, and are masked below
    if b_gate_up is not None:
        h = h + b_gate_up.index_select(0, row_expert)
    act = glu(h, I, clamp)  # [S, I]
    y = grouped_mm(act, w_down.transpose(-2, -1), offs=offs)  # [S, H]
    if b_down is not None:
        y = y + b_down.index_select(0, row_expert)
    y = _masked_combine(y, key_sorted < E, weights.flatten()[perm])  # [S, H] fp32
    y = torch.empty_like(y).index_copy_(0, perm, y)  # [S, H] back in (token, slot) order
    return y.view(T, K, H).sum(1)  # [T, H], fixed order: deterministic


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
    """Point each skipped slot at an expert its token keeps (else one the batch keeps), so a gather reads no new
    expert. Only when the whole batch keeps nothing does a slot read an expert (E - 1) nobody selected; its result
    is masked."""
    key = torch.where(ids < 0, E, ids)  # [T, K]
    first = key.min(dim=1, keepdim=True).values  # [T, 1], E where the token keeps none
    first = torch.where(first == E, key.min(), first).clamp(max=E - 1)  # [T, 1]
    return torch.where(ids < 0, first, ids)  # [T, K]


def _gather_experts(x, w_gate_up, w_down, ids, weights, b_gate_up=None, b_down=None, clamp=None) -> Tensor:
    E, I = w_gate_up.shape[0], w_down.shape[2]
    ids_r = _redirect_skipped(ids, E)  # [T, K]
    # under Inductor with coordinate_descent_tuning the gathers fuse into the M=1 reductions (gpt-fast)
    h = torch.einsum("th,tkjh->tkj", x, w_gate_up[ids_r])  # [T, K, 2I]
    if b_gate_up is not None:
        h = h + b_gate_up[ids_r]
    act = glu(h, I, clamp)  # [T, K, I]
    y = torch.einsum("tki,tkhi->tkh", act, w_down[ids_r])  # [T, K, H]
    if b_down is not None:
        y = y + b_down[ids_r]
    keep = ids >= 0  # [T, K]
    return torch.where(keep[..., None], y.float() * weights[..., None], 0.0).sum(1)  # [T, H] fp32


_TRITON = {}  # triton_kernels()'s result, built once


def triton_kernels():
    """The Triton decode kernels, and the op moe_kernels::slot_experts that launches them, defined and registered
    on the first call (importing triton and torch._inductor takes seconds): by check_path and auto_path when they
    choose the triton path, by DecodeStep before it compiles, and by run() on an eager call. -> {name: kernel}."""
    if _TRITON:
        return _TRITON
    if not HAS_TRITON:
        raise ValueError("expert path triton needs an importable triton (torch >= 2.6)")
    import triton
    import triton.language as tl

    @triton.jit
    def _slot_gate_up_kernel(x_ptr, w_ptr, b_ptr, ids_ptr, act_ptr, K, H, I, alpha, limit,
                             BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BIAS: tl.constexpr, CLAMP: tl.constexpr):
        # program (s, n): act[s, n-tile] = glu(gate, up) of slot s's expert for token s // K
        s = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + s)
        h_end = tl.where(e < 0, 0, H)  # skipped: zero iterations, so not one weight byte is read
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
        # BIAS and CLAMP are constexpr: without them (Qwen, Kimi) neither branch is compiled in
        if BIAS:
            b_mask = n < tl.where(e < 0, 0, I)  # a skipped slot's negative id is no row: it reads no bias
            gate += tl.load(b_ptr + e * 2 * I + n, mask=b_mask, other=0.0).to(tl.float32)
            up += tl.load(b_ptr + e * 2 * I + I + n, mask=b_mask, other=0.0).to(tl.float32)
        if CLAMP:  # gpt-oss's clamped GLU, as glu() writes it
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            act = (up + 1) * (gate * tl.sigmoid(gate * alpha))
        else:
            act = gate * tl.sigmoid(gate) * up
        tl.store(act_ptr + s * I + n, act, mask=n < I)

    @triton.jit
    def _slot_down_kernel(act_ptr, w_ptr, b_ptr, ids_ptr, rw_ptr, y_ptr, H, I,
                          BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BIAS: tl.constexpr):
        # program (s, n): y[s, n-tile] = weight[s] * (down(act[s]) + bias), zeros for a skipped slot
        s = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + s)
        i_end = tl.where(e < 0, 0, I)  # skipped: as above
        w_row = w_ptr + e * H * I + n[:, None] * I
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i0 in range(0, i_end, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            a = tl.load(act_ptr + s * I + i, mask=i < I, other=0.0)
            mask = (n[:, None] < H) & (i[None, :] < I)
            acc += tl.sum(tl.load(w_row + i[None, :], mask=mask, other=0.0).to(tl.float32) * a[None, :], axis=1)
        if BIAS:
            acc += tl.load(b_ptr + e * H + n, mask=n < tl.where(e < 0, 0, H), other=0.0).to(tl.float32)
        y = tl.where(e < 0, 0.0, acc * tl.load(rw_ptr + s))  # the weight of a skipped slot may be NaN
        tl.store(y_ptr + s * H + n, y, mask=n < H)

    # The optional arguments are gpt-oss's: biases [E, 2I] and [E, H], contiguous, and clamp = (alpha, limit); the
    # schema reads them as Tensor? and float[]?. Absent, they reach the kernels as None, which Triton specialises
    # as a constant: the Qwen / Kimi kernels get no extra argument and, with BIAS and CLAMP False, no extra code.
    @torch.library.triton_op("moe_kernels::slot_experts", mutates_args={})
    def _slot_experts(x: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor,
                      b_gate_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None,
                      clamp: Optional[Sequence[float]] = None) -> Tensor:
        T, H = x.shape
        I, K = w_down.shape[2], ids.shape[1]
        act = torch.empty(T * K, I, dtype=torch.float32, device=x.device)  # [S, I]
        y = torch.empty(T * K, H, dtype=torch.float32, device=x.device)  # [S, H]
        (n_gu, k_gu), (n_d, k_d) = TRITON_TILES["gate_up"], TRITON_TILES["down"]
        launch = dict(num_warps=TRITON_TILES["num_warps"], num_stages=TRITON_TILES["num_stages"])
        alpha, limit = (None, None) if clamp is None else clamp
        torch.library.wrap_triton(_slot_gate_up_kernel)[(T * K, triton.cdiv(I, n_gu))](
            x, w_gate_up, b_gate_up, ids, act, K, H, I, alpha, limit, BLOCK_N=n_gu, BLOCK_H=k_gu,
            BIAS=b_gate_up is not None, CLAMP=clamp is not None, **launch)
        torch.library.wrap_triton(_slot_down_kernel)[(T * K, triton.cdiv(H, n_d))](
            act, w_down, b_down, ids, weights, y, H, I, BLOCK_N=n_d, BLOCK_I=k_d, BIAS=b_down is not None, **launch)
        return y

    _TRITON.update(triton=triton, gate_up=_slot_gate_up_kernel, down=_slot_down_kernel, op=_slot_experts)
    return _TRITON


# ---------------------------------------------------------------------------------------------------------------
# The decode step: compiled, and on CUDA captured once in a CUDA graph


class DecodeStep:
    """step(token [B, 1]) -> logits [B, V]: model.decode_step at the next position of `cache`, compiled with
    fullgraph=True (a graph break is an error) and, on CUDA, captured in a CUDA graph on first use and replayed.

    A decode step reads its position from the cache's device tensors, so there is no host-to-device copy per step
    besides the token. Skip policies may change their buffers between calls (thresholds, alpha; tau = 0 skips
    nothing) but must not be replaced: the graph holds their addresses. cache.reset() keeps the graph valid. The
    returned logits are the graph's output buffer, overwritten by the next call. The caller advances
    cache.length, as with model.decode_step."""

    def __init__(self, model, cache, stats=None, compile=True, cuda_graph=None):
        self.cache, self.stats = cache, stats
        if compile and HAS_TRITON and (cache.pos.is_cuda or _TRITON_INTERPRET):
            triton_kernels()  # the compiled step may choose the triton path: its op must exist before tracing
        step = lambda token: model.decode_step(token, cache, stats)  # noqa: E731
        self.fn = torch.compile(step, fullgraph=True, dynamic=False) if compile else step
        self.cuda_graph = cache.pos.is_cuda if cuda_graph is None else cuda_graph
        self.graph = None

    def __call__(self, token):
        if not self.cuda_graph:
            return self.fn(token)
        if self.graph is None:
            self.capture(token.shape[0])
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

    def capture(self, batch):
        cache = self.cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=cache.pos.device)
        # The warm-up runs (compilation, autotuning) really write: at the last cache index, which a decode that
        # fits the cache reaches only with its final token, written before it is read. The bookkeeping they
        # advance is put back in place afterwards, since the graph holds these addresses.
        written = [cache.pos, cache.next_pos, cache.key_valid] + ([] if self.stats is None else [self.stats.counts])
        saved = [t.clone() for t in written]
        cache.pos.fill_(cache.max_len - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                cache.pos.fill_(cache.max_len - 1)
                self.fn(self.token)
        torch.cuda.current_stream().wait_stream(side)
        cache.pos.fill_(cache.max_len - 1)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn(self.token)
        for t, old in zip(written, saved):
            t.copy_(old)
