"""Generation with timing: how fast the prompt is read (prefill) and new tokens come (decode).

transformers' generate hands a streamer the prompt before the first forward and every new token as
it is produced; TimedStreamer notes those moments (and passes them on to a TextStreamer that
prints), so prefill is prompt tokens over the time to the first new token and decode is the tokens
after it over the time they took.

Compiled decode (`compile_decode=True`): at batch 1 a small model's token is mostly framework cost
(Python, dispatch, ~200 op calls), not arithmetic. transformers then keeps the KV cache in fixed-size
tensors (its static cache) and calls the model's forward for each new token through
torch.compile(fullgraph=True): one graph per step, C++ from inductor on a CPU, CUDA graphs on a GPU.
The prompt's forward stays eager (its shape changes with every prompt). The quantized linears trace
without a graph break (llmquant.inference.cpu hands Dynamo the conversion prepared at load). The first decode
step compiles (eval/CPU.md measures how long), so it is not counted in the decode rate, and its time
beyond a steady step's is reported as the compile time; later calls with the same prompt length and
max_new_tokens reuse the graph (their first step then shows ~0 s), others compile again.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class GenerationSpeed:
    prompt_tokens: int  # per sequence
    new_tokens: int
    prefill_seconds: float  # prompt in -> first new token out
    decode_seconds: float  # first counted decode step's start -> last new token
    decode_steps: int = -1  # the decode steps decode_seconds covers (-1: every step after the first token)
    compile_seconds: float = 0.0  # compiled decode: the first step's time beyond a steady step's

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1 if self.decode_steps < 0 else self.decode_steps
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")

    def describe(self) -> str:
        text = (f"prefill {self.prompt_tokens} tokens at {self.prefill_tokens_per_second:.1f} tok/s, "
                f"decode {self.new_tokens} tokens at {self.decode_tokens_per_second:.1f} tok/s")
        if self.decode_steps >= 0:
            text += f" (compiled; compiling the decode step took {self.compile_seconds:.1f} s, not counted)"
        return text


class TimedStreamer(BaseStreamer):
    def __init__(self, inner: BaseStreamer | None = None):
        self.inner = inner
        self.start: float | None = None
        self.prompt_tokens = 0
        self.token_times: list[float] = []

    def put(self, value):
        now = time.perf_counter()
        if self.start is None:
            self.start, self.prompt_tokens = now, value.shape[-1]
        else:
            self.token_times.append(now)
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()

    def speed(self, first_step_compiles: bool = False) -> GenerationSpeed:
        """first_step_compiles: the first decode step carried a compilation, left out of the decode rate."""
        if self.start is None or not self.token_times:
            raise RuntimeError("no tokens were generated")
        times = self.token_times
        prefill = times[0] - self.start
        if not first_step_compiles or len(times) < 3:
            return GenerationSpeed(self.prompt_tokens, len(times), prefill, times[-1] - times[0])
        steps = [b - a for a, b in zip(times, times[1:])]
        return GenerationSpeed(self.prompt_tokens, len(times), prefill, times[-1] - times[1], len(steps) - 1,
                               max(0.0, steps[0] - statistics.median(steps[1:])))


def compiled_decode_options(model, backend: str = "inductor") -> dict:
    """generate() keyword arguments that run every decode step as one compiled graph (module docstring).
    backend: torch.compile's; another than inductor (e.g. "eager", to check the tracing without code
    generation) takes none of inductor's options."""
    from transformers.generation.configuration_utils import CompileConfig

    cuda = next(model.parameters()).device.type == "cuda"
    # freezing: inductor takes the weights as constants of the graph, so it folds what is computed from
    # them alone and merges identical calls (common subexpressions): the q/k/v and gate/up members each
    # trace the stacked matmul of their group (llmquant.inference.cpu.fused), and the graph keeps one of each.
    # (torch.compile takes a mode or options: "reduce-overhead" is the CUDA-graph option)
    options = {"freezing": True, **({"triton.cudagraphs": True} if cuda else {})} if backend == "inductor" else None
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None, backend=backend, options=options)
    # transformers compiles by itself only on accelerators (CUDA, XPU, ...); this switch (private in
    # transformers 5, pinned by tests/test_compiled_decode.py) asks it to on the CPU too.
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def timed_generate(model, inputs: dict, max_new_tokens: int, printer: BaseStreamer | None = None,
                   exact_length: bool = False, compile_decode: bool = False) -> tuple[torch.Tensor, GenerationSpeed]:
    """Greedy generate with its speed; exact_length: all max_new_tokens, no stop at EOS (benchmarks);
    compile_decode: each decode step one compiled graph (module docstring)."""
    timer = TimedStreamer(printer)
    options = {}
    if compile_decode:
        from .cpu import prepare_for_cpu

        prepare_for_cpu(model)  # what the traced forward runs is converted before tracing (no-op off the CPU)
        options = compiled_decode_options(model)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=timer,
                                min_new_tokens=max_new_tokens if exact_length else None, **options)
    return output, timer.speed(first_step_compiles=compile_decode)
