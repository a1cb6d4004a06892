"""GPT-OSS's experts forward with its elementwise work fused (experts implementation "fused").

The lean forward (trainer/experts.py) is transformers' grouped-GEMM path: between and around its two grouped
GEMMs it runs a dozen elementwise kernels, and autograd runs their backwards, each reading and writing the
[tokens x top_k, 2 x intermediate] activations again. Here the same computation is three pieces with backwards
of their own:

- **dispatch**: each token's hidden state copied to its top_k rows, sorted by expert. Autograd's backward of that
  gather is an accumulating scatter; each token's rows are known, so the backward is a gather and a sum of
  top_k rows instead.
- **bias + gate** in one Triton kernel each way: the gate_up bias gathered by expert, gpt-oss's clamped
  gate (`gate * sigmoid(alpha * gate) * (up + 1)`, gate clamped above, up both ways at `limit`) computed in
  float32 and rounded once; the backward recomputes it from the GEMM's output, so nothing else is kept.
- **combine**: the down bias added, each row weighted by its routing weight and the top_k rows of a token summed,
  again as gathers in both directions.

The values are the lean forward's up to rounding: the fused gate rounds once where the eager one rounds after
every operation. The biases must be frozen (they are: LoRA trains only the attention here); a model whose expert
biases train takes the lean forward. Without Triton or off CUDA the gate runs as its torch reference, with the
same explicit backward.
"""

from __future__ import annotations

import torch

from .experts import lean_experts_forward, sort_by_expert, triton  # triton None without it: the references run

if triton is not None:
    import triton.language as tl


# ---------------------------------------------------------------------------------------------- bias + gate
def gate_reference(gate_up: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor, alpha: float,
                   limit: float) -> torch.Tensor:
    """[rows, 2I] GEMM output, [E, 2I] bias, [rows] expert of each row -> [rows, I] gated activations."""
    x = gate_up.float() + bias.float()[expert_ids]
    gate, up = x[..., ::2].clamp(max=limit), x[..., 1::2].clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)).to(gate_up.dtype)


def gate_backward_reference(grad: torch.Tensor, gate_up: torch.Tensor, bias: torch.Tensor,
                            expert_ids: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """The gradient of gate_reference with respect to gate_up; clamps pass the gradient inside their bounds,
    bounds included, as torch.clamp's backward does."""
    x = gate_up.float() + bias.float()[expert_ids]
    gate, up = x[..., ::2], x[..., 1::2]
    clamped_gate, clamped_up = gate.clamp(max=limit), up.clamp(-limit, limit)
    sig = torch.sigmoid(alpha * clamped_gate)
    grad = grad.float()
    grad_gate = grad * (clamped_up + 1) * sig * (1 + alpha * clamped_gate * (1 - sig)) * (gate <= limit)
    grad_up = grad * clamped_gate * sig * ((up >= -limit) & (up <= limit))
    return torch.stack((grad_gate, grad_up), dim=-1).flatten(-2).to(gate_up.dtype)


if triton is not None:
    @triton.jit
    def _gate_inputs(gate_up, bias, expert_ids, row, col, inside, n_cols):
        expert = tl.load(expert_ids + row).to(tl.int64)
        pair = row.to(tl.int64) * 2 * n_cols + 2 * col
        bias_pair = expert * 2 * n_cols + 2 * col
        gate = tl.load(gate_up + pair, mask=inside, other=0).to(tl.float32) + \
            tl.load(bias + bias_pair, mask=inside, other=0).to(tl.float32)
        up = tl.load(gate_up + pair + 1, mask=inside, other=0).to(tl.float32) + \
            tl.load(bias + bias_pair + 1, mask=inside, other=0).to(tl.float32)
        return gate, up, pair

    @triton.jit
    def _gate_forward_kernel(gate_up, bias, expert_ids, out, n_cols, alpha, limit, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = col < n_cols
        gate, up, _ = _gate_inputs(gate_up, bias, expert_ids, row, col, inside, n_cols)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        value = (up + 1) * gate * tl.sigmoid(alpha * gate)
        tl.store(out + row.to(tl.int64) * n_cols + col, value.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _gate_backward_kernel(grad, gate_up, bias, expert_ids, grad_gate_up, n_cols, alpha, limit,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = col < n_cols
        gate, up, pair = _gate_inputs(gate_up, bias, expert_ids, row, col, inside, n_cols)
        g = tl.load(grad + row.to(tl.int64) * n_cols + col, mask=inside, other=0).to(tl.float32)
        clamped_gate = tl.minimum(gate, limit)
        clamped_up = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(alpha * clamped_gate)
        grad_gate = tl.where(gate <= limit,
                             g * (clamped_up + 1) * sig * (1 + alpha * clamped_gate * (1 - sig)), 0.0)
        grad_up = tl.where((up >= -limit) & (up <= limit), g * clamped_gate * sig, 0.0)
        kind = grad_gate_up.dtype.element_ty
        tl.store(grad_gate_up + pair, grad_gate.to(kind), mask=inside)
        tl.store(grad_gate_up + pair + 1, grad_up.to(kind), mask=inside)


GATE_BLOCK = 1024


def _launch(kernel, rows: int, n_cols: int, device: torch.device, *args) -> None:
    grid = (rows, triton.cdiv(n_cols, GATE_BLOCK))
    if device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device
            kernel[grid](*args, BLOCK=GATE_BLOCK)
    else:  # TRITON_INTERPRET=1 only
        kernel[grid](*args, BLOCK=GATE_BLOCK)


def gate_triton(gate_up, bias, expert_ids, alpha: float, limit: float) -> torch.Tensor:
    rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    gate_up, bias, expert_ids = gate_up.contiguous(), bias.contiguous(), expert_ids.contiguous()
    out = torch.empty(rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _launch(_gate_forward_kernel, rows, n_cols, gate_up.device, gate_up, bias, expert_ids, out, n_cols,
                alpha, limit)
    return out


def gate_backward_triton(grad, gate_up, bias, expert_ids, alpha: float, limit: float) -> torch.Tensor:
    rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    grad_gate_up = torch.empty_like(gate_up)
    if rows:
        _launch(_gate_backward_kernel, rows, n_cols, gate_up.device, grad.contiguous(), gate_up, bias,
                expert_ids, grad_gate_up, n_cols, alpha, limit)
    return grad_gate_up


def _uses_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.device.type == "cuda"


class _BiasGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, bias, expert_ids, alpha, limit):
        ctx.save_for_backward(gate_up, bias, expert_ids)
        ctx.constants = alpha, limit
        return (gate_triton if _uses_triton(gate_up) else gate_reference)(gate_up, bias, expert_ids, alpha, limit)

    @staticmethod
    def backward(ctx, grad):
        gate_up, bias, expert_ids = ctx.saved_tensors
        backward = gate_backward_triton if _uses_triton(gate_up) else gate_backward_reference
        return backward(grad, gate_up, bias, expert_ids, *ctx.constants), None, None, None, None


def bias_gate(gate_up, bias, expert_ids, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's `_apply_gate(gate_up + bias[expert_ids])`, fused; differentiable in gate_up only."""
    return _BiasGate.apply(gate_up, bias, expert_ids, float(alpha), float(limit))


# ---------------------------------------------------------------------------------------------- dispatch, combine
class _Dispatch(torch.autograd.Function):
    """hidden [T, H] -> [T x top_k, H] sorted by expert: row j is token perm[j] // top_k."""

    @staticmethod
    def forward(ctx, hidden, perm, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return hidden[perm // top_k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        # token t's rows are inverse[t * top_k + s]: a gather and a sum, not a scatter-add
        return grad[inverse].view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class _Combine(torch.autograd.Function):
    """The sorted rows [T x top_k, H] back to tokens: y[t] = sum_s w[t, s] * (out[inverse[t, s]] + bias[e(t, s)])."""

    @staticmethod
    def forward(ctx, out, bias, top_k_index, weights, perm, inverse):
        tokens, top_k = weights.shape
        rows = out[inverse].view(tokens, top_k, -1) + bias[top_k_index]
        ctx.save_for_backward(rows, weights, perm)
        return (rows * weights.unsqueeze(-1)).sum(dim=1)

    @staticmethod
    def backward(ctx, grad):
        rows, weights, perm = ctx.saved_tensors
        grad_rows = (grad.unsqueeze(1) * weights.unsqueeze(-1)).to(rows.dtype)  # [T, top_k, H]
        grad_out = grad_rows.view(-1, rows.shape[-1])[perm]  # sorted row j is token-slot perm[j]
        grad_weights = torch.bmm(rows, grad.to(rows.dtype).unsqueeze(-1)).squeeze(-1).to(weights.dtype)
        return grad_out, None, None, grad_weights, None, None


# ---------------------------------------------------------------------------------------------- the forward
def fused_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts implementation for transformers (gpt-oss's layout: transposed weights, biases, clamped gate)."""
    from transformers.integrations.moe import _grouped_mm

    if self.gate_up_proj_bias.requires_grad or self.down_proj_bias.requires_grad:
        return lean_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.shape[1]
    expert_ids, perm, offsets = sort_by_expert(top_k_index, self.num_experts)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    selected = _Dispatch.apply(hidden_states, perm, inverse, top_k)
    gate_up = _grouped_mm(selected, self.gate_up_proj, offsets)
    activated = bias_gate(gate_up, self.gate_up_proj_bias, expert_ids, self.alpha, self.limit)
    out = _grouped_mm(activated, self.down_proj, offsets)
    return _Combine.apply(out, self.down_proj_bias, top_k_index, top_k_weights, perm, inverse).to(hidden_states.dtype)


def register_fused_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if "fused" not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register("fused", fused_experts_forward)


register_fused_experts()  # importing this module makes experts_implementation="fused" known to transformers
