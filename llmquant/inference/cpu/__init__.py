"""Fast quantized matmuls on the CPU: conversions applied after loading (as HQQ / torchao do).

The checkpoint and the modules' state_dict stay as they are; on the CPU each quantized linear is
converted once into the layout of the fastest torch op that takes it, one file per path, each
declaring what it accepts:

- int4pack.py: 2-4-bit GPTQ / AWQ through `_weight_int4pack_mm_for_cpu` (act-order permuted);
- int8pack.py: per-channel weights up to 8 bits through `_weight_int8pack_mm`;
- w8a8.py: W8A8 through `torch._int_mm` (CPUs with VNNI / AMX) or `_weight_int8pack_mm`;
- head.py: the unquantized output head at batch-1 decode through a float16 gemv;
- dequantized.py: anything else through a dequantized weight (float16 under fp32), bounded in memory.

selection.py chooses the path per layer and builds the layer's prepared weight (nn/base.py);
importing this package registers it as the CPU's implementation of the ops (ops.register_prepared);
capability.py says what this CPU runs fast.
"""
from .capability import describe as describe_cpu
from .head import describe_head, prepare_output_head
from .selection import (CACHE_MIB_ENV, PATHS, REFERENCE, LayerPath, choose_path, disable_cpu_paths, kernel_for,
                        path_table, prepare_for_cpu, summary)
from ..ops import register_prepared

register_prepared("cpu", kernel_for)

__all__ = ["CACHE_MIB_ENV", "PATHS", "REFERENCE", "LayerPath", "choose_path", "describe_cpu", "describe_head",
           "disable_cpu_paths", "kernel_for", "path_table", "prepare_for_cpu", "prepare_output_head", "summary"]
