"""GPT-OSS's frozen MoE experts for training: kept as the checkpoint's MXFP4 blocks and scales, and a lean forward.

**MXFP4 kept** (`keep_experts_mxfp4`): each layer's expert weights stay on the device as the published uint8 blocks
and scales, as vLLM keeps them (a quarter of their bf16 bytes), and are dequantized inside the experts' forward into
a temporary of the model's dtype. The temporary lives while the layer's autograd graph does; with gradient
checkpointing the forward runs again in the layer's backward and dequantizes again, so one layer's experts at most
are whole at a time. The frozen experts get no gradient, so nothing but the dequantized values is ever needed.
Dequantization is exact: every MXFP4 value is an E2M1 code times a power of two, representable in bf16, so the
logits equal those of the model dequantized at load (transformers' `Mxfp4Config(dequantize=True)`).

The layout, as transformers 5.17's `integrations/mxfp4.py` reads it: `<proj>_blocks` is [experts, rows, cols/32,
16] bytes, two E2M1 codes per byte, low nibble first; `<proj>_scales` is [experts, rows, cols/32], one exponent
per 32 values with bias 127. Rows are the projection's outputs: gate_up_proj's blocks are [E, 2I, H/32, 16] for a
parameter transformers holds as [E, H, 2I], so the forward uses the dequantized [E, 2I, H] transposed (a view).

**Lean forward** (`lean_experts_forward`, experts implementation "lean"): transformers' grouped_mm experts path less
its expert-parallel handling (sentinel masks filled before and after each grouped GEMM, a clamp, an inverse
permutation built by scatter), which is dead work where all experts are local: the same GEMMs, biases, gate and
routing weights, in the same order, so the same values.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# E2M1 codes 0..15: sign bit 3, exponent bits 2-1, mantissa bit 0 (transformers' FP4_VALUES)
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # values per scale
SCALE_BIAS = 127
PROJECTIONS = ("gate_up_proj", "down_proj")


def dequantize_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., rows, groups, 16] uint8 codes and [..., rows, groups] uint8 exponents -> [..., rows, groups * 32]."""
    *prefix, groups, pairs = blocks.shape
    if tuple(scales.shape) != (*prefix, groups) or pairs != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack(((blocks & 0x0F).long(), (blocks >> 4).long()), dim=-1)  # low nibble first
    values = lut[codes].reshape(*prefix, groups, MXFP4_BLOCK)
    scale = torch.exp2(scales.to(torch.float32) - SCALE_BIAS).unsqueeze(-1)  # exact: a power of two
    return (values * scale).reshape(*prefix, groups * MXFP4_BLOCK).to(dtype)


def e2m1_bits(code: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of each E2M1 code (int32 0..15), as the CUDA kernel builds it: 0.5 x mantissa for
    exponent 0, else 2^(exponent - 1) x (1 + mantissa / 2); the reference's lookup table, without a table."""
    sign, exponent, mantissa = (code >> 3) & 1, (code >> 1) & 3, code & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    subnormal = mantissa * (126 << 23)  # 0.5 or 0
    return torch.where(exponent == 0, subnormal, normal) | (sign << 31)


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: the reference runs instead
    triton = None

if triton is not None:
    @triton.jit
    def _e2m1(code):  # e2m1_bits, then the bits as float32
        sign = (code >> 3) & 1
        exponent = (code >> 1) & 3
        mantissa = code & 1
        normal = ((exponent + 126) << 23) | (mantissa << 22)
        subnormal = mantissa * (126 << 23)
        bits = tl.where(exponent == 0, subnormal, normal) | (sign << 31)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _dequantize_kernel(blocks, scales, out, n_groups, BLOCK: tl.constexpr):
        # BLOCK consecutive 32-value groups per program: 16 bytes read and 32 values written per group, in order,
        # so loads and stores are both contiguous across the program's threads
        group = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = group < n_groups
        pair = tl.arange(0, 16)
        byte = tl.load(blocks + group[:, None] * 16 + pair[None, :], mask=inside[:, None], other=0).to(tl.int32)
        exponent = tl.load(scales + group, mask=inside, other=127).to(tl.int32)
        # 2^(e - 127) from its bits (exact, where exp2 may approximate); e = 0, a subnormal 2^-127, reads 0
        scale = (exponent << 23).to(tl.float32, bitcast=True)[:, None]
        values = tl.interleave(_e2m1(byte & 15) * scale, _e2m1(byte >> 4) * scale)  # low, high, low, high, ...
        offsets = group[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(out + offsets, values.to(out.dtype.element_ty), mask=inside[:, None])


def dequantize_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                      block: int = 128) -> torch.Tensor:
    *prefix, groups, pairs = blocks.shape
    if tuple(scales.shape) != (*prefix, groups) or pairs != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(*prefix, groups * MXFP4_BLOCK, dtype=dtype, device=blocks.device)
    n_groups = scales.numel()
    grid = (triton.cdiv(n_groups, block),)
    if blocks.device.type == "cuda":
        with torch.cuda.device(blocks.device):  # Triton launches on the current device
            _dequantize_kernel[grid](blocks, scales, out, n_groups, BLOCK=block)
    else:  # TRITON_INTERPRET=1 only
        _dequantize_kernel[grid](blocks, scales, out, n_groups, BLOCK=block)
    return out


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 to `dtype`: the Triton kernel on CUDA, the reference elsewhere (the same values)."""
    if blocks.device.type == "cuda" and triton is not None:
        return dequantize_triton(blocks, scales, dtype)
    return dequantize_reference(blocks, scales, dtype)


# ---------------------------------------------------------------------------------------------- the lean forward
def sort_by_expert(top_k_index: torch.Tensor, num_experts: int):
    """The token-slots sorted by expert: each slot's expert, the sorting permutation, and each expert's end offset
    in the sorted rows (what a grouped GEMM takes)."""
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    # histc: bincount would break CUDA graphs; histc takes floats on the CPU, integers under CUDA determinism
    counts = torch.histc(expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=num_experts, min=0, max=num_experts - 1)
    return expert_ids, perm, torch.cumsum(counts, dim=0, dtype=torch.int32)


def lean_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward` for experts that are all local (no expert parallelism), with
    gpt-oss's layout (transposed weights, biases, gate)."""
    from transformers.integrations.moe import _grouped_mm

    num_tokens, top_k = top_k_index.shape
    expert_ids, perm, offsets = sort_by_expert(top_k_index, self.num_experts)
    selected = hidden_states[perm // top_k]
    gate_up = _grouped_mm(selected, self.gate_up_proj, offsets) + self.gate_up_proj_bias[expert_ids]
    out = _grouped_mm(self._apply_gate(gate_up), self.down_proj, offsets) + self.down_proj_bias[expert_ids]
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    unsorted = torch.empty_like(out)
    unsorted[perm] = out
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def register_lean_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if "lean" not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register("lean", lean_experts_forward)


register_lean_experts()  # importing this module makes experts_implementation="lean" known to transformers


def use_experts_forward(model, forward: str = "lean") -> bool:
    """Switch a model on transformers' grouped_mm experts to `forward` ("lean", or "fused", which
    trainer/fused_experts.py registers); True if it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) != "grouped_mm" or not experts_modules(model):
        return False
    model.set_experts_implementation(forward)
    return True


# ---------------------------------------------------------------------------------------------- MXFP4 kept
class _DequantizedExperts:
    """The experts module as an experts implementation reads it, its weights the dequantized temporaries."""

    def __init__(self, module, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        self._module = module
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def __getattr__(self, name):
        return getattr(self._module, name)


def _experts_function(module):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    eager = module._eager_forward
    implementation = module.config._experts_implementation
    if implementation == "eager" or implementation is None:
        return eager
    return ALL_EXPERTS_FUNCTIONS.get_interface(implementation, eager)


def mxfp4_experts_forward(self, hidden_states, router_indices=None, routing_weights=None):
    with torch.no_grad():  # frozen: constants to autograd, freed with the layer's graph
        weights = [dequantize(getattr(self, f"{proj}_blocks"), getattr(self, f"{proj}_scales"),
                              self.dequantized_dtype).transpose(-1, -2) for proj in PROJECTIONS]
    return _experts_function(self)(_DequantizedExperts(self, *weights), hidden_states, router_indices,
                                   routing_weights)


_mxfp4_classes: dict[type, type] = {}


def _mxfp4_class(experts_class: type) -> type:
    """`experts_class` with its weights as MXFP4 buffers (the same module otherwise: biases, gate, config)."""
    if experts_class in _mxfp4_classes.values():
        return experts_class
    if experts_class not in _mxfp4_classes:
        # the class's own per-expert loop, under transformers' dispatching decorator
        eager = getattr(experts_class.forward, "__wrapped__", experts_class.forward)
        _mxfp4_classes[experts_class] = type(f"Mxfp4{experts_class.__name__}", (experts_class,), {
            "forward": mxfp4_experts_forward, "_eager_forward": staticmethod(eager),
            "extra_repr": lambda self: f"MXFP4 blocks {tuple(self.gate_up_proj_blocks.shape)}, "
                                       f"{tuple(self.down_proj_blocks.shape)}, dequantized to {self.dequantized_dtype}"})
    return _mxfp4_classes[experts_class]


def has_mxfp4_experts(model) -> bool:
    return any(type(m) in _mxfp4_classes.values() for m in model.modules())


def experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The MoE experts modules (those with gate_up_proj and down_proj in gpt-oss's layout), by name."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj_bias") and hasattr(m, "down_proj_bias")]


class CheckpointTensors:
    """Tensors of a safetensors checkpoint (a local directory or a Hub name in the cache), read one at a time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        index = self._file("model.safetensors.index.json", required=False)
        if index is not None:
            self.weight_map = json.loads(Path(index).read_text())["weight_map"]
        else:
            self.weight_map = None

    def _file(self, filename: str, required: bool = True) -> str | None:
        local = Path(self.model_name)
        if local.is_dir():
            path = local / filename
            if path.exists():
                return str(path)
            if required:
                raise FileNotFoundError(path)
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.model_name, filename)
        except EntryNotFoundError:
            if required:
                raise
            return None

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        filename = self.weight_map[key] if self.weight_map is not None else "model.safetensors"
        with safe_open(self._file(filename), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def attach_mxfp4(module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None,
                 drop_dense: bool = True) -> int:
    """Give an experts module its weights as MXFP4 (`weights`: projection -> blocks, scales, on the module's
    device), dequantized in its forward to `dtype` (default: its biases' dtype). `drop_dense` frees the dense
    weights; kept, they stay for comparisons (the module computes from the MXFP4 ones). Returns the MXFP4 bytes."""
    kept = 0
    for proj in PROJECTIONS:
        blocks, scales = weights[proj]
        weight = getattr(module, proj)
        experts, rows, groups, _ = blocks.shape
        # transformers holds [E, in, out]; the blocks are [E, out, in / 32, 16]
        if (experts, groups * MXFP4_BLOCK, rows) != tuple(weight.shape):
            raise ValueError(f"{proj}: MXFP4 blocks {tuple(blocks.shape)} do not match the weight "
                             f"{tuple(weight.shape)}")
        if drop_dense:
            delattr(module, proj)
        module.register_buffer(f"{proj}_blocks", blocks, persistent=False)
        module.register_buffer(f"{proj}_scales", scales, persistent=False)
        kept += blocks.numel() + scales.numel()
    module.dequantized_dtype = dtype or module.gate_up_proj_bias.dtype
    module.__class__ = _mxfp4_class(type(module))
    return kept


def keep_experts_mxfp4(model, model_name: str, dtype: torch.dtype | None = None) -> int:
    """Replace each experts module's weights, loaded dequantized, by the checkpoint's MXFP4 blocks and scales
    (frozen buffers on the weights' device); the forward dequantizes them to `dtype` (default: the experts' biases'
    dtype). Returns the bytes the experts' weights now take."""
    tensors = CheckpointTensors(model_name)
    modules = experts_modules(model)
    if not modules:
        raise ValueError("no MoE experts found to keep in MXFP4")
    kept = 0
    for name, module in modules:
        device = module.gate_up_proj_bias.device
        kept += attach_mxfp4(module, {proj: (tensors.get(f"{name}.{proj}_blocks").to(device),
                                             tensors.get(f"{name}.{proj}_scales").to(device))
                                      for proj in PROJECTIONS}, dtype)
    log.info("experts kept in MXFP4: %d modules, %.2f GiB", len(modules), kept / 2**30)
    return kept


def check_kernel_against_reference(model) -> None:
    """On CUDA, the kernel's dequantization of one expert of the first layer must equal the reference's: a wrong
    kernel would train on wrong weights without an error."""
    for _, module in experts_modules(model):
        if type(module) not in _mxfp4_classes.values():
            continue
        for proj in PROJECTIONS:
            blocks, scales = getattr(module, f"{proj}_blocks")[:1], getattr(module, f"{proj}_scales")[:1]
            if blocks.device.type != "cuda":
                return
            got = dequantize(blocks, scales, module.dequantized_dtype)
            want = dequantize_reference(blocks, scales, module.dequantized_dtype)
            if not torch.equal(got, want):
                raise RuntimeError(f"the MXFP4 dequantization kernel differs from the reference on {proj} "
                                   f"({(got.float() - want.float()).abs().max().item():.3g} at most): set "
                                   "EXPERTS_FORMAT=bf16")
        return
