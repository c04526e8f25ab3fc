"""Benchmark of llmquant's quantized matmuls against the fp16 matmul, plus end-to-end decode speed.

    python kernels/bench.py --device cuda --json eval/kernels-h100.json --md eval/KERNELS.md
    TRITON_INTERPRET=1 python kernels/bench.py --device cpu --quick     # exercises the script on a CPU

Per kernel (W4A16 on the GPTQ and AWQ layouts at group 128, W8A8 dynamic per token including the
activation quantization, NF4 with double quantization), Llama-class shape K x N and batch M: time
per call, TFLOP/s, effective GB/s (packed weight + scales + activations + output, read or written
once), speed-up over torch's fp16 matmul of the same shape timed in the same run, and the fraction
of the memory roofline (a device-to-device copy measured in the same run). Before timing, each
kernel is checked against its torch reference at that shape (M = 16).

On a GPU the ops run the Triton kernels (tuned per shape on first call; fp16 activations). On a CPU
the ops run the torch reference (what llmquant serves there; fp32 against fp32 matmul) on shapes
scaled down 8x, and each Triton kernel is checked once under the interpreter on a small shape:
those timings describe the CPU fallback, not the kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]
BATCHES = [1, 4, 16, 64, 256, 1024, 4096]
GROUP = 128


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call: triton's do_bench on a GPU, median of wall-clock runs on a CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50) / 1e3
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), device, 5)
    return 2 * a.numel() * 4 / seconds


def random_operands(kind: str, k: int, n: int, device: str, dtype: torch.dtype) -> dict:
    """Packed tensors of a [n, k] weight with random codes (timing needs layouts, not trained values),
    scales in fp16, or fp32 when the activations are (the CPU reference)."""
    return _scales_in(_packed_operands(kind, k, n, device), dtype)


def _packed_operands(kind: str, k: int, n: int, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(k * 7 + n)
    groups = -(-k // GROUP)

    def randint(high, shape, dt=torch.int32):
        return torch.randint(0, high, shape, generator=g, dtype=torch.int64).to(dt).to(device)

    if kind == "w4a16-gptq":
        return {"qweight": randint(2**31, (k // 8, n)), "qzeros": randint(2**31, (groups, n // 8)),
                "scales": (torch.rand(groups, n, generator=g) * 0.01).half().to(device),
                "g_idx": (torch.arange(k) // GROUP).int().to(device)}
    if kind == "w4a16-awq":
        return {"qweight": randint(2**31, (k, n // 8)), "qzeros": randint(2**31, (groups, n // 8)),
                "scales": (torch.rand(groups, n, generator=g) * 0.01).half().to(device)}
    if kind == "w8a8":
        return {"weight": randint(255, (n, k)).sub(127).to(torch.int8),
                "weight_scale": (torch.rand(n, 1, generator=g) * 0.01).to(device)}
    if kind in ("fp8", "fp8-block"):  # e4m3 codes of random normal values, scales per channel / per 128 x 128
        codes = torch.randn(n, k, generator=g).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
        shape = (n, 1) if kind == "fp8" else (-(-n // GROUP), -(-k // GROUP))
        return {"weight": codes, "weight_scale": (torch.rand(*shape, generator=g) * 0.01).to(device)}
    if kind == "nf4-dq":
        blocks = -(-n * k // 64)
        return {"packed": randint(256, (n * k // 2, 1), torch.uint8), "absmax": randint(256, (blocks,), torch.uint8),
                "table": torch.linspace(-1, 1, 16).to(device), "nested_absmax": torch.rand(-(-blocks // 256)).to(device),
                "nested_table": torch.linspace(-1, 1, 256).to(device)}
    raise ValueError(kind)


def _scales_in(tensors: dict, dtype: torch.dtype) -> dict:
    """fp16 scales as the activations' dtype on the CPU, where the reference computes in fp32."""
    if dtype == torch.float16:
        return tensors
    return {key: (v.float() if v.dtype == torch.float16 else v) for key, v in tensors.items()}


def weight_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def op_call(kind: str, x: torch.Tensor, t: dict, k: int, n: int):
    from llmquant.inference import ops

    if kind == "fp8":
        return lambda: ops.fp8_linear(x, t["weight"], t["weight_scale"], None)
    if kind == "fp8-block":
        return lambda: ops.fp8_block_linear(x, t["weight"], t["weight_scale"], None, GROUP)

    if kind == "w4a16-gptq":
        return lambda: ops.gptq_linear(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 1)
    if kind == "w4a16-awq":
        return lambda: ops.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], None, GROUP)
    if kind == "w8a8":
        return lambda: ops.w8a8_linear(x, t["weight"], t["weight_scale"], None, None)
    nested = (t["nested_absmax"], t["nested_table"], 0.01, 256)
    return lambda: ops.codebook4_linear(x, t["packed"], t["absmax"], t["table"], nested, 64, (n, k), None)


def reference_call(kind: str, x: torch.Tensor, t: dict, k: int, n: int):
    from llmquant.inference import ops

    with ops.use_backend("reference"):
        return op_call(kind, x, t, k, n)()


def check(kind: str, x: torch.Tensor, t: dict, k: int, n: int) -> float:
    """Largest |kernel - reference| relative to the reference's largest magnitude."""
    got = op_call(kind, x, t, k, n)().float()
    expected = reference_call(kind, x.float() if x.device.type == "cpu" else x, t, k, n).float()
    return ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def interpreter_check() -> dict:
    """Each Triton kernel once under the interpreter (CPU mode), against the reference, on a small shape."""
    from llmquant.inference import ops

    results = {}
    x = torch.randn(3, 256)
    for kind in ("w4a16-gptq", "w4a16-awq", "w8a8", "nf4-dq"):
        t = random_operands(kind, 256, 128, "cpu", torch.float32)
        with ops.use_backend("triton"):
            results[kind] = check(kind, x, t, 256, 128)
    return results


def decode_tokens_per_second(device: str, dtype: torch.dtype, new_tokens: int) -> dict:
    """Greedy decode of SmolLM2-135M, batch 1: fp16 (CPU: fp32) model vs its 4-bit GPTQ-format checkpoint."""
    import tempfile

    import llmquant
    from llmquant import QuantConfig

    qmodel = llmquant.quantize("smollm2-135m", QuantConfig(method="rtn", bits=4, group_size=128), progress=False)
    tokenizer = qmodel.tokenizer
    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids.to(device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        qmodel.save(Path(tmp) / "q")
        del qmodel
        from llmquant.models import load_fp_model

        fp_model = load_fp_model("smollm2-135m")[0].to(device=device, dtype=dtype)
        quantized = llmquant.load(Path(tmp) / "q", dtype=dtype).to(device)
        for name, model in (("fp", fp_model), ("w4a16", quantized)):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                if device == "cuda":
                    torch.cuda.synchronize()
            results[name] = new_tokens / (time.perf_counter() - start)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--kinds", nargs="+", default=["w4a16-gptq", "w4a16-awq", "w8a8", "nf4-dq"])
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="two shapes, three batches")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    device = args.device
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("CPU mode checks the Triton kernels under the interpreter: run with TRITON_INTERPRET=1")
    dtype = torch.float16 if device == "cuda" else torch.float32
    scale = 1 if device == "cuda" else 8
    shapes = [(k // scale, n // scale) for k, n in (SHAPES[:2] if args.quick else SHAPES)]
    batches = args.batches or ([1, 16, 64] if args.quick else BATCHES if device == "cuda" else [1, 4, 16, 64, 256])
    peak = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores, torch reference ops)"
    report = {"device": name, "dtype": str(dtype), "copy_bandwidth_GBps": peak / 1e9, "rows": []}
    if device == "cpu":
        report["interpreter_check_rel_error"] = interpreter_check()
    print(f"# {name}: copy bandwidth {peak / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    for kind in args.kinds:
        for k, n in shapes:
            t = random_operands(kind, k, n, device, dtype)
            w_fp = torch.randn(n, k, device=device, dtype=dtype)
            # M = 32: CUDA's int8 matmul (the W8A8 reference) wants more than 16 rows
            error = check(kind, torch.randn(32, k, device=device, dtype=dtype), t, k, n)
            if device == "cuda" and (k, n) == shapes[0]:
                report.setdefault("bf16_check_rel_error", {})[kind] = check(
                    kind, torch.randn(32, k, device=device, dtype=torch.bfloat16), t, k, n)
            for m in batches:
                x = torch.randn(m, k, device=device, dtype=dtype)
                seconds = timed(op_call(kind, x, t, k, n), device, 3)
                baseline = timed(lambda: x @ w_fp.t(), device, 3)
                moved = weight_bytes(t) + x.numel() * x.element_size() + m * n * x.element_size()
                row = {"kind": kind, "K": k, "N": n, "M": m, "us": seconds * 1e6,
                       "TFLOPs": 2 * m * n * k / seconds / 1e12, "GBps": moved / seconds / 1e9,
                       "speedup_vs_fp": baseline / seconds, "roofline_fraction": moved / seconds / peak,
                       "fp_us": baseline * 1e6, "check_rel_error": error}
                report["rows"].append(row)
                print(f"{kind:11s} K={k:5d} N={n:5d} M={m:4d}: {row['us']:9.1f} us  {row['TFLOPs']:7.2f} TFLOP/s "
                      f"{row['GBps']:7.1f} GB/s  x{row['speedup_vs_fp']:.2f} vs fp  "
                      f"{100 * row['roofline_fraction']:.0f}% of copy", file=sys.stderr, flush=True)
    if args.decode_tokens:
        try:
            report["decode_tokens_per_second"] = decode_tokens_per_second(device, dtype, args.decode_tokens)
            print(f"decode tok/s: {report['decode_tokens_per_second']}", file=sys.stderr, flush=True)
        except Exception as exc:  # e.g. the offline model packages are not installed on a GPU machine
            report["decode_not_run"] = f"{type(exc).__name__}: {exc}"
            print(f"decode not run: {report['decode_not_run']}", file=sys.stderr, flush=True)
    lines = [f"Device: {name}; activations {dtype}; copy bandwidth {peak / 1e9:.1f} GB/s.", "",
             "| kernel | K | N | M | µs | TFLOP/s | GB/s | × fp matmul | % of copy BW | check rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['kind']} | {r['K']} | {r['N']} | {r['M']} | {r['us']:.1f} | {r['TFLOPs']:.2f} | "
                     f"{r['GBps']:.1f} | {r['speedup_vs_fp']:.2f} | {100 * r['roofline_fraction']:.0f} | "
                     f"{r['check_rel_error']:.1e} |")
    if "decode_tokens_per_second" in report:
        d = report["decode_tokens_per_second"]
        lines += ["", f"Decode, SmolLM2-135M, batch 1, greedy: fp {d['fp']:.1f} tok/s, W4A16 (GPTQ g128) "
                      f"{d['w4a16']:.1f} tok/s."]
    if "decode_not_run" in report:
        lines += ["", f"Decode not run: {report['decode_not_run']}"]
    if "bf16_check_rel_error" in report:
        lines += ["", "bf16 activations vs reference (relative max error, first shape): "
                  + ", ".join(f"{k} {v:.1e}" for k, v in report["bf16_check_rel_error"].items())]
    if "interpreter_check_rel_error" in report:
        lines += ["", "Triton kernels under the interpreter vs reference (relative max error): "
                  + ", ".join(f"{k} {v:.1e}" for k, v in report["interpreter_check_rel_error"].items())]
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
