"""An architecture map derived from a model's module tree, for families without a declared one.

The usual decoder layout is: one ModuleList of identical decoder blocks (as long as
config.num_hidden_layers), each holding attention projections and MLP projections as nn.Linear
under the names the field uses (q/k/v/o, gate/up/down, fc1/fc2, ...). The blocks are that one list;
each linear gets its sequential step from its name (attention input, attention output, MLP input,
MLP output), the part of the block it sits in telling `dense` / `c_proj` / `wo` apart. The
quantization pipeline then passes a calibration sample through the first block it quantizes, with
hooks on its linears, to check that the linears of a step read one and the same tensor and that the
steps run in this order (check_steps_by_forward; without calibration data the order changes
nothing; `llmquant models` runs the check on tiny random models).
Anything that does not fit (no such list, several, a linear whose name says nothing, a step whose
linears read different tensors) is an UnsupportedArchitectureError naming it.

A derived map has no scaling pairs (which operation feeds a linear channel by channel is not
in the names), so AWQ and SmoothQuant, which fold scales there, ask for a declared map.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .base import ArchMap

ATTENTION_INPUT, ATTENTION_OUTPUT, MLP_INPUT, MLP_OUTPUT = range(4)
STEP_NAMES = ("attention input", "attention output", "MLP input", "MLP output")
# leaf name -> step; names used by both halves of a block are decided by the part they sit in
ROLES = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value",
                     "wqkv", "c_attn", "q", "k", "v", "wq", "wk", "wv"), ATTENTION_INPUT),
    **dict.fromkeys(("o_proj", "out_proj", "wo_attn", "o"), ATTENTION_OUTPUT),
    **dict.fromkeys(("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h",
                     "fc_in", "wi", "wi_0", "wi_1", "up", "gate"), MLP_INPUT),
    **dict.fromkeys(("down_proj", "fc2", "w2", "dense_4h_to_h", "fc_out", "down"), MLP_OUTPUT),
}
BY_PART = {"dense": (ATTENTION_OUTPUT, MLP_OUTPUT), "c_proj": (ATTENTION_OUTPUT, MLP_OUTPUT),
           "wo": (ATTENTION_OUTPUT, MLP_OUTPUT)}
ATTENTION_PARTS = ("attn", "attention")
MLP_PARTS = ("mlp", "ffn", "feed_forward", "feedforward")


def derive_arch(model: nn.Module) -> ArchMap:
    """A map for `model` from its module tree (see the module docstring)."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    blocks_path, blocks = _block_list(model, model_type)
    linears = [name for name, module in blocks[0].named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        kinds = sorted({type(m).__name__ for m in blocks[0].modules() if getattr(m, "weight", None) is not None
                        and getattr(m.weight, "dim", lambda: 0)() == 2})
        raise _error(model_type, f"its decoder blocks ({blocks_path}) hold no nn.Linear"
                     + (f" (their 2-D weights sit in {', '.join(kinds)})" if kinds else ""))
    steps: list[list[str]] = [[] for _ in STEP_NAMES]
    for name in linears:
        steps[_step_of(name, model_type)].append(name)
    for index, block in enumerate(blocks):
        here = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
        if here != linears:
            raise _error(model_type, f"block {index} of {blocks_path} holds other linears than block 0 "
                         f"({', '.join(sorted(set(here) ^ set(linears))[:4])})")
    sequential = tuple(tuple(step) for step in steps if step)
    return ArchMap(name=f"{model_type} (derived)", model_types=(model_type,), blocks=blocks_path,
                   sequential=sequential, derived=True)


def _error(model_type: str, reason: str) -> UnsupportedArchitectureError:
    from . import supported_model_types

    return UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}: no declared map, and none can be derived: {reason}; "
        f"declared maps: {', '.join(supported_model_types())}")


def _block_list(model: nn.Module, model_type: str) -> tuple[str, nn.ModuleList]:
    layers = getattr(model.config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or (layers is not None and len(module) != layers):
            continue
        if len({type(child) for child in module}) == 1 and any(True for _ in module[0].parameters()):
            candidates.append((name, module))
    # lists nested in a block (experts, heads) are not the decoder blocks
    outermost = [(n, m) for n, m in candidates if not any(n.startswith(other + ".") for other, _ in candidates)]
    if len(outermost) != 1:
        found = ", ".join(n for n, _ in outermost) or "none"
        raise _error(model_type, f"expected one list of {layers} identical decoder blocks, found {found}")
    return outermost[0]


def _step_of(name: str, model_type: str) -> int:
    parts = name.split(".")
    leaf, path = parts[-1], ".".join(parts[:-1]).lower()
    in_attention = any(p in path for p in ATTENTION_PARTS)
    in_mlp = any(p in path for p in MLP_PARTS)
    if leaf.lower() in BY_PART:
        attention_step, mlp_step = BY_PART[leaf.lower()]
        if in_attention != in_mlp:
            return attention_step if in_attention else mlp_step
        raise _error(model_type, f"{name}: a '{leaf}' linear outside a recognizable attention or MLP part")
    step = ROLES.get(leaf.lower())
    if step is None:
        raise _error(model_type, f"cannot tell which input the linear {name} reads from its name")
    if (in_attention and step in (MLP_INPUT, MLP_OUTPUT)) or (in_mlp and step in (ATTENTION_INPUT, ATTENTION_OUTPUT)):
        raise _error(model_type, f"{name}: its name says {STEP_NAMES[step]}, the part it sits in says otherwise")
    return step


@torch.no_grad()
def check_steps_by_forward(block: nn.Module, arch: ArchMap, run: Callable[[], object]) -> None:
    """run() passes a sample through `block`: the linears of each step must read one tensor, in step
    order. The quantization pipeline calls it on the first block it quantizes, whatever holds the
    model (in memory or streamed from disk)."""
    model_type = arch.model_types[0]
    read: dict[str, tuple[int, int]] = {}  # linear -> (call order, id of the tensor it read)
    kept = []  # holds the tensors so that their ids stay unique

    def hook(name):
        def record(module, args):
            if name not in read:
                read[name] = (len(read), id(args[0]))
                kept.append(args[0])
        return record

    names = arch.linear_names()
    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in read]
    if missing:
        raise _error(model_type, f"{', '.join(missing)} did not run in a forward pass of the first block")
    last_order = -1
    for step in arch.sequential:
        if len({read[name][1] for name in step}) != 1:
            raise _error(model_type, f"{', '.join(step)} are named as one step but read different tensors")
        first = min(read[name][0] for name in step)
        if first < last_order:
            raise _error(model_type, f"{', '.join(step)} run before the step their names put before them")
        last_order = max(read[name][0] for name in step)


def check_model_by_forward(model: nn.Module, arch: ArchMap) -> None:
    """check_steps_by_forward on the first block of a model with real weights, by a few tokens through it."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(8).remainder(vocab)[None].to(model.get_input_embeddings().weight.device)
    check_steps_by_forward(arch.block_list(model)[0], arch, lambda: model(input_ids=ids, use_cache=False))


# Families without a declared map that `llmquant models` derives a map for on a tiny random-init
# model of transformers' own config class (and gpt2, whose Conv1D projections are refused).
SURVEYED = ("olmo", "olmo2", "granite", "stablelm", "cohere", "starcoder2", "phi", "gpt_neox", "falcon", "bloom",
            "exaone4", "seed_oss", "ernie4_5", "gpt2")
_SURVEY_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     n_layer=2, n_embd=64, n_head=4)


def survey(model_types=SURVEYED) -> list[tuple[str, ArchMap | None, str]]:
    """(model type, derived map or None, why not) for each family, from a tiny random-init model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    results = []
    verbosity = transformers_logging.get_verbosity()
    for model_type in model_types:
        try:
            # some families' default configs contradict themselves (a BOS id past their own
            # vocabulary); transformers warns about them, which says nothing about the user's model
            transformers_logging.set_verbosity_error()
            try:
                config = AutoConfig.for_model(model_type)
            finally:
                transformers_logging.set_verbosity(verbosity)
            config.update({k: v for k, v in _SURVEY_SIZES.items() if hasattr(config, k)})
            for special in ("bos_token_id", "eos_token_id", "pad_token_id"):  # beyond the tiny vocabulary
                if isinstance(getattr(config, special, None), int) and getattr(config, special) >= config.vocab_size:
                    setattr(config, special, None)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config).eval()
        # Any error here means only that this transformers version has no such family or builds it
        # from other settings than the tiny ones above: that family is listed as refused, with why.
        except Exception as exc:
            first_line = (str(exc).splitlines() or [""])[0][:160]
            results.append((model_type, None, f"no tiny model could be built ({type(exc).__name__}: {first_line})"))
            continue
        try:  # our own code: only a refusal is an answer, anything else a fault that propagates
            arch = derive_arch(model)
            check_model_by_forward(model, arch)
            results.append((model_type, arch, ""))
        except UnsupportedArchitectureError as exc:
            results.append((model_type, None, str(exc).split(": ", 2)[-1].split("; declared maps")[0]))
    return results
