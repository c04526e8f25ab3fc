"""The call quantized linears make before their op: the converted CPU kernel, if any. llmquant.inference.cpu
(which imports these modules to convert them) registers its chooser here when it is imported, so
this package needs nothing from it."""
from __future__ import annotations

_kernel_for = None


def register_cpu_kernels(kernel_for) -> None:
    """kernel_for(module, x): the converted kernel to run `module` on x, or None (always off the CPU)."""
    global _kernel_for
    _kernel_for = kernel_for


def cpu_kernel_for(module, x):
    """The kernel to run, or None; asked off the CPU too, so that a module moved off it lets go of its
    CPU conversion."""
    if _kernel_for is None:
        return None
    return _kernel_for(module, x)
