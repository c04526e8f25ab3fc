"""The call quantized linears make before their op: the converted CPU kernel (llmquant.cpu), if any.
Imported on first use because llmquant.cpu itself imports these modules."""
from __future__ import annotations


def cpu_kernel_for(module, x):
    if x.device.type != "cpu":
        return None
    from ..cpu import kernel_for

    return kernel_for(module, x)
