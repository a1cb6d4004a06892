"""GPT-OSS's frozen experts kept in MXFP4 (trainer/experts.py) against the model dequantized at load, and the lean
experts forward against transformers' grouped_mm and eager ones, on the tiny MXFP4 checkpoint in gpt-oss's layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

from conftest import REPO
from trainer import experts
from trainer.config import SettingsError
from trainer.model import load_model, lora_config


def random_mxfp4(experts_: int, rows: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts_, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (experts_, rows, groups), dtype=torch.uint8, generator=g)
    return blocks, scales


def test_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4(3, 40, 6)
    scales[0, 0, 0], scales[0, 0, 1] = 1, 254  # the extreme normal exponents
    want = convert_moe_packed_tensors(blocks, scales)  # [E, cols, rows] bf16, as the model holds its weights
    got = experts.dequantize_reference(blocks, scales, torch.bfloat16)  # [E, rows, cols]
    assert torch.equal(got.transpose(1, 2), want)
    assert torch.equal(experts.dequantize_reference(blocks, scales, torch.float32), got.float())  # exact in bf16


def test_the_kernels_e2m1_decoding_is_the_lookup_table():
    bits = experts.e2m1_bits(torch.arange(16, dtype=torch.int32)).view(torch.float32)
    assert bits.tolist() == list(experts.FP4_VALUES)
    assert [str(v)[0] == "-" for v in bits.tolist()] == [c >= 8 for c in range(16)]  # signed zeros too


def test_the_triton_kernel_equals_the_reference_in_the_interpreter():
    """Triton's interpreter runs the CUDA kernel's code on the CPU (where Triton is installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed here (the GPU benchmark compares the kernel with the reference)")
    script = textwrap.dedent("""
        import torch
        from trainer import experts
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, 256, (3, 40, 6, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(100, 140, (3, 40, 6), dtype=torch.uint8, generator=g)
        for dtype in (torch.bfloat16, torch.float32):
            got = experts.dequantize_triton(blocks, scales, dtype, block=16)
            assert torch.equal(got, experts.dequantize_reference(blocks, scales, dtype)), dtype
        print("equal")
    """)
    run_in_triton_interpreter(script)


def run_in_triton_interpreter(script: str) -> None:
    """Run `script`, which prints "equal" when its checks pass, with Triton's interpreter on the CPU."""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1",
                                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
                            timeout=300)
    assert result.returncode == 0 and "equal" in result.stdout, result.stderr[-3000:]


def experts_module(seed: int = 0, dtype=torch.float32):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=64, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)
    module = GptOssExperts(config).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def run_experts(module, implementation: str, hidden, index, weights):
    module.config._experts_implementation_internal = implementation
    hidden = hidden.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    out = module(hidden, index, weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), hidden.grad, weights.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_experts_equal_transformers_grouped_mm_and_eager(dtype):
    module = experts_module(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    tokens = 37
    hidden = torch.randn(tokens, 64, generator=g).to(dtype)
    index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])
    index[:5] = torch.tensor([0, 1])  # an expert with many tokens; expert 5 may get none
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1).to(dtype)
    lean = run_experts(module, "lean", hidden, index, weights)
    grouped = run_experts(module, "grouped_mm", hidden, index, weights)
    for a, b in zip(lean, grouped):
        assert torch.equal(a, b)  # the same operations in the same order
    eager = run_experts(module, "eager", hidden, index, weights)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(lean, eager):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)


def lora_model(checkpoint, experts_format: str, experts_forward: str = "lean"):
    model = load_model(str(checkpoint), "float32", "eager", 30, gradient_checkpointing=True,
                       experts_format=experts_format, experts_forward=experts_forward)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(0)
    config = lora_config(4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    config.init_lora_weights = False  # every LoRA matrix gets a gradient
    model = get_peft_model(model, config)
    model.train()  # checkpointing recomputes the layers (and dequantizes again) in backward
    return model


def micro_step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
    (-logp.mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_mxfp4_experts_give_the_logits_and_lora_gradients_of_the_model_dequantized_at_load(mxfp4_checkpoint):
    reference = lora_model(mxfp4_checkpoint, "bf16")
    kept = lora_model(mxfp4_checkpoint, "auto")
    base = kept.get_base_model()
    assert experts.has_mxfp4_experts(base) and not experts.has_mxfp4_experts(reference.get_base_model())
    # the experts' weights are the checkpoint's MXFP4 bytes: a quarter byte per weight plus a byte per 32
    layer = base.model.layers[0].mlp.experts
    assert not hasattr(layer, "gate_up_proj") or not isinstance(getattr(layer, "gate_up_proj", None), torch.nn.Parameter)
    expert_weights = sum(p.numel() for m in reference.get_base_model().modules() if type(m).__name__ == "GptOssExperts"
                         for name, p in m.named_parameters() if not name.endswith("bias"))
    mxfp4_bytes = sum(b.numel() * b.element_size() for name, b in base.named_buffers() if "_blocks" in name or "_scales" in name)
    assert mxfp4_bytes == expert_weights // 2 + expert_weights // 32
    assert all(b.dtype == torch.uint8 for name, b in base.named_buffers() if "_blocks" in name or "_scales" in name)

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    for implementation in ("lean", "grouped_mm", "eager"):
        for model in (reference, kept):
            model.get_base_model().set_experts_implementation(implementation)
        want_logits, want_grads = micro_step(reference, ids)
        got_logits, got_grads = micro_step(kept, ids)
        assert torch.equal(got_logits, want_logits), implementation
        assert got_grads.keys() == want_grads.keys() and len(want_grads) == 16
        for name, grad in want_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-8, msg=f"{implementation} {name}")


def test_the_loaded_model_uses_the_lean_experts_and_float32_experts_in_float32(mxfp4_checkpoint):
    model = load_model(str(mxfp4_checkpoint), "float32", "eager", 30, gradient_checkpointing=True,
                       experts_format="bf16")
    assert model.config._experts_implementation == "lean"
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32


def test_experts_forward_fused_trains_the_model_as_the_lean_forward_does(mxfp4_checkpoint):
    """EXPERTS_FORWARD=fused: the loaded model computes its experts with the fused forward, with the lean forward's
    logits and LoRA gradients (float32: within rounding)."""
    lean = lora_model(mxfp4_checkpoint, "auto")
    fused = lora_model(mxfp4_checkpoint, "auto", experts_forward="fused")
    assert lean.get_base_model().config._experts_implementation == "lean"
    assert fused.get_base_model().config._experts_implementation == "fused"
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(4))
    want_logits, want_grads = micro_step(lean, ids)
    got_logits, got_grads = micro_step(fused, ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == 16
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mxfp4_refuses_a_checkpoint_that_is_not(tiny_model):
    with pytest.raises(SettingsError, match="EXPERTS_FORMAT=mxfp4"):
        load_model(str(tiny_model), "float32", "eager", 30, gradient_checkpointing=True, experts_format="mxfp4")
    model = load_model(str(tiny_model), "float32", "eager", 30, gradient_checkpointing=True)  # auto: as it is
    assert not experts.has_mxfp4_experts(model)


def test_the_microstep_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/bench_microstep.py (gpu.sh microstep) end to end on the CPU, torch.compile left out for time."""
    import json

    out = tmp_path / "microstep.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_microstep.py"), "--tiny", "--repeats", "1",
                             "--skip", "mxfp4_lean_compiled,mxfp4_fused_compiled_layers", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dequantize"]["kernel_equals_reference"]
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["bf16_grouped_mm", "bf16_lean", "mxfp4_grouped_mm", "mxfp4_lean", "mxfp4_fused",
                          "mxfp4_fused_lora_bf16", "no_grad_forward"]
    assert not [r["error"] for r in rows.values() if "error" in r]
    # the same weights and operations in bf16; the fused gate rounds once where the others round at each operation
    for name in ("bf16_lean", "mxfp4_grouped_mm", "mxfp4_lean", "mxfp4_fused"):
        assert rows[name]["logprobs_rel_error"] < 1e-3 and rows[name]["lora_grad_rel_error_max"] < 1e-2, rows[name]
    assert rows["bf16_lean"]["logprobs_rel_error"] == 0 and rows["bf16_lean"]["lora_grad_rel_error_max"] == 0
    assert all(r["tok_per_s"] > 0 for r in rows.values())


@pytest.mark.parametrize("experts_format", ["auto", "bf16"])
def test_two_ranks_train_the_gradients_of_one_process(mxfp4_checkpoint, tmp_path, experts_format):
    """Two gloo ranks: with the experts in MXFP4 each holds the model whole (no FSDP2), with bf16 experts FSDP2
    shards it; either way the batch's LoRA gradients are one process's (benchmarks/grad_agreement.py)."""
    from conftest import free_port

    script = str(REPO / "benchmarks/grad_agreement.py")
    common = ["--dtype", "float32", "--tokens", "24", "--sequences", "4", "--experts-format", experts_format]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, script, str(mxfp4_checkpoint), "split", str(tmp_path / "one.pt"), *common],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), script, str(mxfp4_checkpoint), "ranks",
                          str(tmp_path / "two.pt"), *common],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    log = two.stdout + two.stderr
    if experts_format == "auto":
        assert "frozen base kept whole on each of 2 ranks" in log and "FSDP2:" not in log
    else:
        assert "FSDP2: 2 decoder layers sharded over 2 ranks" in log
    first, second = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert first.keys() == second.keys() and len(first) == 16
    for name, grad in first.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(second[name], grad, rtol=1e-4, atol=1e-6, msg=name)
