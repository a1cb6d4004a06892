"""GPT-OSS attention (learned sinks, a sliding window on every other layer, grouped KV heads, padded batches) as
the trainer computes it, against a float64 reference written here from the definition: each query's softmax over
the keys it may see, with the head's sink logit added to the denominator and no value behind it.

- eager, the path on CPU, through transformers' own mask construction and GPT-OSS attention function;
- the FA4 wrapper (`trainer.attention`), registered with transformers, with FlashAttention 4's varlen kernel
  replaced by a float64 test double (`reference_varlen_kernel`): the kernel runs only on Hopper/Blackwell GPUs, so
  on CPU the double stands in for it, honouring the kernel's contract (token-major layout, cumulative sequence
  lengths, FlashAttention's inclusive window, sinks of shape (heads,)). The transposes, the sinks and window the
  wrapper passes, and the padding mask are what is checked here; the kernel itself is checked on the GPU by
  benchmarks/attention_check.py;
- the start check: a kernel known to lose the sinks' gradients is refused (exit 2), FA4 where it cannot run is
  named with the reason.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_oss import modeling_gpt_oss

import trainer.attention as attention
from conftest import REPO
from trainer.config import SettingsError
from trainer.preflight import checked_settings

HEADS, KV_HEADS, HEAD_DIM, WINDOW, SEQ = 4, 2, 16, 4, 12
# float64 through the same operations in another order: only rounding at 2^-52 differs
FLOAT64_TOLERANCE = 1e-12
# Relative error (norm of the difference over the reference's norm) that eager may show at each precision.
# float32: unit roundoff 6e-8 and a few dozen terms per dot product and softmax sum: measured 8e-8 to 2.4e-7.
# bfloat16: unit roundoff 3.9e-3, and eager rounds the logits and probabilities to bf16 before the value
# product: measured 8e-4 to 4.2e-3. The bounds leave about 5x above the worst measured.
EAGER_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------ the reference and the test double
def reference_attention(q, k, v, sinks, keep, window):
    """q (batch, heads, seq, dim); k, v (batch, kv_heads, seq, dim); sinks (heads,); keep (batch, seq) bool, the
    tokens that are not padding; window: how many tokens a query sees, itself included (None: all before it).
    Returns (batch, seq, heads, dim) in float64; rows of padding queries are zero."""
    q, k, v, sinks = (t.double() for t in (q, k, v, sinks))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(q.shape[2])[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    visible = visible[None, None] & keep[:, None, None, :] & keep[:, None, :, None]
    sink = sinks[None, :, None, None]
    top = torch.maximum(logits.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True), sink)
    weights = torch.exp(logits - top) * visible
    probs = weights / (weights.sum(-1, keepdim=True) + torch.exp(sink - top))
    return torch.einsum("bhij,bhjd->bihd", probs, v)


def reference_varlen_kernel(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            causal, window_size, learnable_sink):
    """Test double of `flash_attn.cute.flash_attn_varlen_func`, in float64: the same arguments, layouts and window
    convention (window_size=(left, right): keys from `left` before the query to `right` after it, both inclusive;
    causal aligns the last query with the last key). Returns (out, lse) as the kernel does."""
    total_q, heads, dim = q.shape
    assert k.shape[1:] == v.shape[1:] == (k.shape[1], dim) and heads % k.shape[1] == 0, (q.shape, k.shape)
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and cu_seqlens_q[-1] == total_q
    assert cu_seqlens_k[-1] == k.shape[0] and learnable_sink.shape == (heads,) and causal
    assert max_seqlen_q == int(cu_seqlens_q.diff().max()) and max_seqlen_k == int(cu_seqlens_k.diff().max())
    left, right = window_size
    outs, lses = [], []
    for b in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].double()
        ks, vs = (t[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].double() for t in (k, v))
        ks, vs = (t.repeat_interleave(heads // k.shape[1], dim=1) for t in (ks, vs))
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * softmax_scale
        i = torch.arange(len(qs))[:, None] + len(ks) - len(qs)
        j = torch.arange(len(ks))[None, :]
        allowed = (j <= i) & ((j >= i - left) if left is not None else True)
        if right is not None:
            allowed &= j <= i + right
        scores = scores.masked_fill(~allowed, float("-inf"))
        with_sink = torch.cat([scores, learnable_sink.double()[:, None, None].expand(-1, len(qs), 1)], dim=-1)
        lse = with_sink.logsumexp(-1)
        probs = torch.exp(with_sink - lse[..., None])[..., :-1]
        outs.append(torch.einsum("hij,jhd->ihd", probs, vs))
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=-1).float()


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setattr(attention, "fa4_varlen_kernel", lambda: reference_varlen_kernel)


# ------------------------------------------------------------------ inputs
def config(implementation: str) -> GptOssConfig:
    return GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                        num_local_experts=2, num_experts_per_tok=2, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                        experts_implementation="eager", attn_implementation=implementation)


PADDINGS = {  # (left pads, right pads) per row: TRL pads prompts on the left and completions on the right
    "none": [(0, 0), (0, 0)],
    "left": [(3, 0), (0, 0)],
    "left and right": [(5, 0), (1, 2)],
}


def keep_mask(padding) -> torch.Tensor:
    keep = torch.ones(len(padding), SEQ, dtype=torch.bool)
    for row, (left, right) in enumerate(padding):
        keep[row, :left] = False
        keep[row, SEQ - right:] = False
    return keep


def layer_inputs(layer: int, dtype: torch.dtype, seed: int = 0):
    """A GPT-OSS attention layer (sinks spread as the trained model's are) and random q, k, v, upstream gradient."""
    torch.manual_seed(seed)
    module = modeling_gpt_oss.GptOssAttention(config("eager"), layer_idx=layer)
    with torch.no_grad():
        module.sinks.normal_(0.0, 2.0)
    module = module.to(dtype)
    q = torch.randn(2, HEADS, SEQ, HEAD_DIM, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(2, KV_HEADS, SEQ, HEAD_DIM, dtype=torch.float64).to(dtype) for _ in range(2))
    upstream = torch.randn(2, SEQ, HEADS, HEAD_DIM, dtype=torch.float64)
    return module, q, k, v, upstream


def mask_as_the_model_builds_it(implementation: str, layer: int, keep: torch.Tensor, dtype: torch.dtype):
    builder = create_sliding_window_causal_mask if layer == 0 else create_causal_mask
    return builder(config=config(implementation), inputs_embeds=torch.zeros(len(keep), SEQ, 8, dtype=dtype),
                   attention_mask=keep.long(), past_key_values=None)


def output_and_grads(attend, q, k, v, sinks, upstream, keep):
    """The attention output on the real tokens and the gradients of q, k, v and the sinks, the loss summed over
    the real tokens only (as the trainer's, whose padding positions carry no label)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    sinks.grad = None
    out = attend(q, k, v)
    (out.double() * upstream * keep[:, :, None, None]).sum().backward()
    return out.detach().double()[keep], [t.grad.double() for t in (q, k, v, sinks)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()  # a gradient may be zero in both


def compare(attend, module, q, k, v, upstream, keep, tolerance) -> list[float]:
    """`attend`'s output and gradients against the float64 reference's on the same (rounded) inputs."""
    got_out, got_grads = output_and_grads(attend, q, k, v, module.sinks, upstream, keep)
    sinks = module.sinks.detach().double().requires_grad_(True)

    def reference(q, k, v):
        return reference_attention(q, k, v, sinks, keep, module.sliding_window)
    want_out, want_grads = output_and_grads(reference, q.double(), k.double(), v.double(), sinks, upstream, keep)
    errors = [relative_error(got_out, want_out)] + [relative_error(g, w) for g, w in zip(got_grads, want_grads)]
    assert max(errors) < tolerance, dict(zip(["output", "dq", "dk", "dv", "dsinks"], errors))
    return errors


# ------------------------------------------------------------------ eager, the CPU path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding window", "full"])
def test_eager_attention_matches_float64_reference(layer, padding, dtype):
    module, q, k, v, upstream = layer_inputs(layer, dtype)
    keep = keep_mask(PADDINGS[padding])
    mask = mask_as_the_model_builds_it("eager", layer, keep, dtype)

    def eager(q, k, v):
        return modeling_gpt_oss.eager_attention_forward(module, q, k, v, mask, scaling=module.scaling,
                                                        sliding_window=module.sliding_window, s_aux=module.sinks)[0]
    errors = compare(eager, module, q, k, v, upstream, keep, EAGER_TOLERANCE[dtype])
    print(f"eager {dtype}: relative errors output/dq/dk/dv/dsinks {['%.1e' % e for e in errors]}")


# ------------------------------------------------------------------ the FA4 wrapper, kernel replaced by the double
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding window", "full"])
def test_fa4_wrapper_passes_layout_sinks_window_and_padding(reference_kernel, layer, padding):
    module, q, k, v, upstream = layer_inputs(layer, torch.float64)
    keep = keep_mask(PADDINGS[padding])
    mask = mask_as_the_model_builds_it(attention.FA4, layer, keep, torch.float64)
    assert (mask is None) == (padding == "none")  # transformers' flash mask: None when nothing is padded

    def fa4(q, k, v):  # as GptOssAttention calls the registered function
        return ALL_ATTENTION_FUNCTIONS[attention.FA4](module, q, k, v, mask, dropout=0.0, scaling=module.scaling,
                                                      sliding_window=module.sliding_window, s_aux=module.sinks)[0]
    compare(fa4, module, q, k, v, upstream, keep, FLOAT64_TOLERANCE)


def test_fa4_wrapper_gives_padding_queries_zero_output(reference_kernel):
    module, q, k, v, _ = layer_inputs(0, torch.float64)
    keep = keep_mask(PADDINGS["left and right"])
    mask = mask_as_the_model_builds_it(attention.FA4, 0, keep, torch.float64)
    out = attention.fa4_attention_forward(module, q, k, v, mask, scaling=module.scaling,
                                          sliding_window=module.sliding_window, s_aux=module.sinks)[0]
    assert out.shape == (2, SEQ, HEADS, HEAD_DIM)
    assert out[~keep].abs().max() == 0 and out[keep].abs().min() > 0


def test_fa4_in_the_whole_model_matches_eager(reference_kernel):
    """Both GPT-OSS layer types through GptOssForCausalLM, a left- and a right-padded row: the same logits on the
    real tokens and the same gradient of every parameter, sinks and q/k/v/o included."""
    torch.manual_seed(0)
    eager = GptOssForCausalLM(config("eager")).double()
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    fa4 = GptOssForCausalLM(config("eager")).double()
    fa4.load_state_dict(eager.state_dict())
    fa4.set_attn_implementation(attention.FA4)
    ids = torch.randint(0, 64, (2, SEQ))
    keep = keep_mask(PADDINGS["left and right"])
    results = []
    for model in (eager, fa4):
        logits = model(input_ids=ids, attention_mask=keep.long()).logits
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        (-(logp * keep[:, 1:]).sum()).backward()
        results.append((logits.detach()[keep], {n: p.grad for n, p in model.named_parameters()}))
    (eager_logits, eager_grads), (fa4_logits, fa4_grads) = results
    assert relative_error(fa4_logits, eager_logits) < FLOAT64_TOLERANCE
    assert eager_grads.keys() == fa4_grads.keys() and any("sinks" in n for n in eager_grads)
    for name, grad in eager_grads.items():
        assert relative_error(fa4_grads[name], grad) < 1e-10, name


def test_fa4_refuses_attention_dropout(reference_kernel):
    module, q, k, v, _ = layer_inputs(0, torch.float64)
    with pytest.raises(ValueError, match="ATTN_IMPLEMENTATION=fa4: FlashAttention 4 has no attention dropout"):
        attention.fa4_attention_forward(module, q, k, v, None, dropout=0.1, scaling=module.scaling)


# ------------------------------------------------------------------ the start check
@pytest.fixture(scope="module")
def gpt_oss_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-gpt-oss"
    config("eager").save_pretrained(path)
    return path


def start_settings(model, runs, **env) -> dict[str, str]:
    return {"MODEL_NAME": str(model), "DATASET": "sample", "RUNS_DIR": str(runs), "HF_HUB_OFFLINE": "1", **env}


@pytest.mark.parametrize("name", ["kernels-community/vllm-flash-attn3", "kernels-community/vllm-flash-attn3@main",
                                  "flash_attention_3", "flash_attention_2", "sdpa", "flash_attention_4"])
def test_a_kernel_that_loses_the_sinks_is_refused_for_gpt_oss(gpt_oss_model, tmp_path, name):
    with pytest.raises(SettingsError) as err:
        checked_settings(start_settings(gpt_oss_model, tmp_path, ATTN_IMPLEMENTATION=name))
    [problem] = err.value.problems
    assert problem.startswith(f"ATTN_IMPLEMENTATION={name!r}: ") and problem.endswith("use fa4 (GPU) or eager")


def test_the_same_kernel_is_left_alone_for_a_model_without_sinks(tiny_model, tmp_path):
    settings = checked_settings(start_settings(tiny_model, tmp_path,
                                               ATTN_IMPLEMENTATION="kernels-community/vllm-flash-attn3"))
    assert settings.attn_implementation == "kernels-community/vllm-flash-attn3"


def test_fa4_where_it_cannot_run_is_named_with_the_reason(gpt_oss_model, tmp_path, monkeypatch):
    # The test environment installs the trainer image's packages, flash-attn-4 among them, on a host without GPU.
    env = start_settings(gpt_oss_model, tmp_path, ATTN_IMPLEMENTATION="fa4", TORCH_DTYPE="float32")
    with pytest.raises(SettingsError) as err:
        checked_settings(env)
    assert err.value.problems == [
        "ATTN_IMPLEMENTATION='fa4': it needs a CUDA GPU and none is visible: use eager "
        "(or auto: fa4 where it can run, else eager)",
        "ATTN_IMPLEMENTATION='fa4' computes in bfloat16 or float16 only, and TORCH_DTYPE=float32: set "
        "TORCH_DTYPE=bfloat16 or use eager"]
    # An environment without the package (not this one): its absence is faked.
    def not_installed(name):
        raise attention.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(attention.importlib.metadata, "version", not_installed)
    with pytest.raises(SettingsError) as err:
        checked_settings({**env, "TORCH_DTYPE": "bfloat16"})
    assert err.value.problems == ["ATTN_IMPLEMENTATION='fa4': the flash-attn-4 package is not installed (the trainer "
                                  "image has it): use eager (or auto: fa4 where it can run, else eager)"]


def test_auto_is_eager_where_fa4_cannot_run(gpt_oss_model, tmp_path):
    settings = checked_settings(start_settings(gpt_oss_model, tmp_path, ATTN_IMPLEMENTATION="auto"))
    assert settings.attn_implementation == "eager"


def test_every_loader_takes_auto_as_the_kernel_it_resolves_to(tmp_path):
    """Benchmarks and scripts that read the settings without the launcher still get a kernel transformers knows."""
    from trainer.model import load_model
    GptOssForCausalLM(config("eager")).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), "bfloat16", "auto", 30, gradient_checkpointing=True)
    assert model.config._attn_implementation == attention.resolved_attn_implementation("auto", "bfloat16")


def test_the_entry_script_refuses_the_kernel_with_exit_2(gpt_oss_model, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           **start_settings(gpt_oss_model, tmp_path, ATTN_IMPLEMENTATION="kernels-community/vllm-flash-attn3")}
    result = subprocess.run([sys.executable, str(REPO / "trainer/train_grpo_vllm.py")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ATTN_IMPLEMENTATION='kernels-community/vllm-flash-attn3': this Hub kernel computes the sinks forward " \
           "but has no backward for them" in result.stderr
    assert "Traceback" not in result.stderr
