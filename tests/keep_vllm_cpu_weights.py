"""Run a Python script with vLLM's CPU build keeping its linear layers' weights, as the GPU build does.

    python tests/keep_vllm_cpu_weights.py SCRIPT [ARGS ...]

After loading, vLLM's CPU build hands each linear layer's weight to a packed oneDNN kernel and drops the weight
itself (`dispatch_cpu_unquantized_gemm`), so nothing can load new weights into a running engine there, as TRL's
colocated layout does after every step. The layers keep them through the flag vLLM's CPU path already reads for
layers it leaves unpacked; the engine, its sampling and TRL's weight push are otherwise vLLM's and TRL's own.
"""

import runpy
import sys

from vllm.model_executor.layers import linear

process_weights = linear.UnquantizedLinearMethod.process_weights_after_loading


def keep_weights(self, layer):
    layer._cpu_skip_gemm_dispatch = True
    return process_weights(self, layer)


linear.UnquantizedLinearMethod.process_weights_after_loading = keep_weights
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
