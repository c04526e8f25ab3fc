from dataclasses import replace

from .gemma3 import GEMMA3

# Gemma-2 has Gemma-3's block layout (norms around attention and MLP, RMSNorm by 1 + weight, BOS
# needed at the start of every window); Gemma-3 added q/k norms inside attention, which no map names.
GEMMA2 = replace(GEMMA3, name="gemma2", model_types=("gemma2",))
