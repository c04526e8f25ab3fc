"""The call quantized linears make before their op: the converted CPU kernel, if any. llmquant.cpu
(which imports these modules to convert them) registers its chooser here when it is imported, so
this package needs nothing from it."""
from __future__ import annotations

_kernel_for = None


def register_cpu_kernels(kernel_for) -> None:
    """kernel_for(module, x): the converted kernel to run `module` on the CPU tensor x, or None."""
    global _kernel_for
    _kernel_for = kernel_for


def cpu_kernel_for(module, x):
    if _kernel_for is None or x.device.type != "cpu":
        return None
    return _kernel_for(module, x)
