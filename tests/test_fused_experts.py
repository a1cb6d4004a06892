"""The fused experts forward (trainer/fused_experts.py) against transformers' own experts, and its Triton kernels
against their torch references in Triton's interpreter."""

import copy
import textwrap

import torch

from trainer import fused_experts  # noqa: F401  (registers "fused" with transformers)
from test_experts import experts_module, run_experts, run_in_triton_interpreter


def routed_tokens(dtype, tokens: int = 37, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=g).to(dtype)
    index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])
    index[:5] = torch.tensor([0, 1])  # an expert with many tokens; expert 5 may get none
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1).to(dtype)
    return hidden, index, weights


def test_fused_experts_give_the_outputs_and_gradients_of_transformers_experts():
    """float32 (grouped GEMMs take no float64): a wrong hand-written backward would be off by far more."""
    module = experts_module(dtype=torch.float32)
    module.limit = 1.5  # many values on both sides of the clamps, so their gradient masks are exercised
    hidden, index, weights = routed_tokens(torch.float32)
    fused = run_experts(module, "fused", hidden, index, weights)
    for implementation in ("grouped_mm", "eager"):
        reference = run_experts(module, implementation, hidden, index, weights)
        for name, a, b in zip(("output", "hidden grad", "routing-weight grad"), fused, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} vs {implementation}")


def test_fused_experts_in_bf16_stay_within_rounding_of_the_lean_forward():
    module = experts_module(dtype=torch.bfloat16)
    hidden, index, weights = routed_tokens(torch.bfloat16)
    fused = run_experts(module, "fused", hidden, index, weights)
    lean = run_experts(module, "lean", hidden, index, weights)
    exact = run_experts(copy.deepcopy(module).float(), "lean", hidden.float(), index, weights.float())
    for a, b, c in zip(fused, lean, exact):
        # the fused gate rounds once, the eager one after every operation: no further from float32 than lean
        assert (a.float() - c).norm() <= 1.05 * (b.float() - c).norm()


def test_trainable_expert_biases_take_the_lean_forward():
    module = experts_module(dtype=torch.float32)
    hidden, index, weights = routed_tokens(torch.float32)
    module.gate_up_proj_bias.requires_grad_(True)
    module.config._experts_implementation_internal = "fused"
    module(hidden, index, weights).sum().backward()
    assert module.gate_up_proj_bias.grad is not None and module.gate_up_proj_bias.grad.abs().sum() > 0


def test_the_gate_kernels_equal_their_references_in_the_interpreter():
    script = textwrap.dedent("""
        import torch
        from trainer import fused_experts as f
        g = torch.Generator().manual_seed(0)
        rows, n_cols, experts = 19, 1500, 5  # two column blocks, the second partial
        for dtype in (torch.float32, torch.bfloat16):
            gate_up = (torch.randn(rows, 2 * n_cols, generator=g) * 6).to(dtype)
            bias = torch.randn(experts, 2 * n_cols, generator=g).to(dtype)
            ids = torch.randint(0, experts, (rows,), generator=g)
            grad = torch.randn(rows, n_cols, generator=g).to(dtype)
            got = f.gate_triton(gate_up, bias, ids, 1.702, 7.0)
            want = f.gate_reference(gate_up, bias, ids, 1.702, 7.0)
            tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
            torch.testing.assert_close(got, want, **tol)
            got = f.gate_backward_triton(grad, gate_up, bias, ids, 1.702, 7.0)
            want = f.gate_backward_reference(grad, gate_up, bias, ids, 1.702, 7.0)
            torch.testing.assert_close(got, want, **tol)
            assert (want == 0).any() and (want != 0).any()  # clamped entries, and others
        print("equal")
    """)
    run_in_triton_interpreter(script)
