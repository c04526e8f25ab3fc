"""Generation with timing: how fast the prompt is read (prefill) and new tokens come (decode).

transformers' generate hands a streamer the prompt before the first forward and every new token as
it is produced; TimedStreamer notes those moments (and passes them on to a TextStreamer that
prints), so prefill is prompt tokens over the time to the first new token and decode is the tokens
after it over the time they took.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class GenerationSpeed:
    prompt_tokens: int  # per sequence
    new_tokens: int
    prefill_seconds: float  # prompt in -> first new token out
    decode_seconds: float  # first new token -> last

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")

    def describe(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens at {self.prefill_tokens_per_second:.1f} tok/s, "
                f"decode {self.new_tokens} tokens at {self.decode_tokens_per_second:.1f} tok/s")


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

    def speed(self) -> GenerationSpeed:
        if self.start is None or not self.token_times:
            raise RuntimeError("no tokens were generated")
        first, last = self.token_times[0], self.token_times[-1]
        return GenerationSpeed(self.prompt_tokens, len(self.token_times), first - self.start, last - first)


def timed_generate(model, inputs: dict, max_new_tokens: int, printer: BaseStreamer | None = None,
                   exact_length: bool = False) -> tuple[torch.Tensor, GenerationSpeed]:
    """Greedy generate with its speed; exact_length: all max_new_tokens, no stop at EOS (benchmarks)."""
    timer = TimedStreamer(printer)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=timer,
                                min_new_tokens=max_new_tokens if exact_length else None)
    return output, timer.speed()
