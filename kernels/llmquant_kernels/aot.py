"""Compile proof without a GPU: every Triton kernel x every launch configuration its launcher can
choose x every dtype and variant it is specialized on x every GPU target, compiled ahead of time
(Triton ships ptxas), with the shared memory, registers and spills each one needs.

    python -m llmquant_kernels.aot --write --markdown eval/KERNELS.md   # compile what changed, record it
    python -m llmquant_kernels.aot --check                              # compile everything, compare
    python -m llmquant_kernels.aot --check --sample                     # a few per kernel and target

The combinations come from the kernels' own declarations (KernelSpec, beside each kernel), the
ones the launchers read. --write records them in compiled.json (next to this file), which the
launcher reads on a GPU to drop the candidates that cannot launch there, and rewrites the table
in the markdown file. A record is reused while the kernel's source (with the JIT functions it
calls) and the Triton version are unchanged, so editing one kernel recompiles only its rows.

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled). Each compile is a
fixed specialization: pointers 16-byte aligned and N, K and strides multiples of 16 (what real
shapes give); the constexprs outside a spec's variants at the value that generates the most code.
Numbers are Triton's (metadata.shared) and ptxas's (-v: registers, stack frame, spill bytes).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("llmquant_kernels.aot compiles for GPUs: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import SPECS  # noqa: E402
from ._launch import (LAUNCH_KEYS, RECORDED_TABLE, SHARED_MEMORY_PER_BLOCK, KernelSpec,  # noqa: E402
                      config_id, recorded_target)

MARKERS = ("<!-- compile-proof table: begin (python -m llmquant_kernels.aot --write --markdown ...) -->",
           "<!-- compile-proof table: end -->")


def shared_limit(target: int) -> int:
    return SHARED_MEMORY_PER_BLOCK[divmod(target, 10)]


@functools.lru_cache(maxsize=None)
def source_hash(kernel: JITFunction) -> str:
    """The kernel's source and that of every JIT function it calls, transitively (line numbers and
    everything else in the file left out, unlike Triton's own cache key)."""
    digest, seen = hashlib.sha256(), set()

    def visit(fn):
        if id(fn) in seen:
            return
        seen.add(id(fn))
        digest.update(fn.src.encode())
        for name in sorted(set(re.findall(r"[A-Za-z_]\w*", fn.src))):
            called = fn.__globals__.get(name)
            if isinstance(called, JITFunction):
                visit(called)

    visit(kernel)
    return digest.hexdigest()[:16]


def combinations(specs=SPECS) -> list[tuple[KernelSpec, str, str, dict, int]]:
    """(spec, variant, dtype, config, target) of everything the launchers can choose on a GPU."""
    return [(spec, variant, dtype, config, target) for spec in specs for variant in spec.variants
            for dtype in spec.dtypes for config in spec.gpu_configs() for target in spec.targets]


def key_of(spec, variant, dtype, config, target) -> tuple:
    return spec.name, variant, dtype, config_id(config), target


def _ptxas_numbers(log: str) -> dict:
    def number(pattern):
        found = re.findall(pattern, log)
        return int(found[-1]) if found else None

    return {"regs": number(r"Used (\d+) registers"), "stack": number(r"(\d+) bytes stack frame"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads")}


def compile_one(spec: KernelSpec, variant: str, dtype: str, config: dict, target: int) -> dict:
    """The record of one combination: what its compile needs, or the compiler's error."""
    constants = {**spec.variants[variant], **spec.fixed, **{k: config[k] for k in LAUNCH_KEYS if k in config}}
    types = spec.argument_types(dtype, constants)
    names = spec.kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    missing = [n for n in names if n not in types and n not in constants]
    if missing:
        raise ValueError(f"{spec.name}: no type or value for {missing}")
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items()
               if t.startswith("*") or n in ("N", "K") or n.startswith("stride")}
    record = {"kernel": spec.name, "variant": variant, "dtype": dtype, "config": config_id(config), "target": target,
              "source": source_hash(spec.kernel), "triton": triton.__version__, "error": None}
    started = time.perf_counter()
    log = io.StringIO()
    # Triton's own cache would skip ptxas (and its -v log) for a kernel compiled before and would keep
    # a thousand binaries: each compile goes to a folder of its own, removed after.
    try:
        with tempfile.TemporaryDirectory(prefix="llmquant-aot-") as cache, contextlib.redirect_stdout(log):
            triton.knobs.cache.dir = cache
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(fn=spec.kernel, signature=signature, constexprs=constants, attrs=aligned),
                                      target=GPUTarget("cuda", target, 32),
                                      options={"num_warps": config.get("num_warps", 4),
                                               "num_stages": config.get("num_stages", 3)})
        record.update(shared=compiled.metadata.shared, **_ptxas_numbers(log.getvalue()))
    except Exception as exc:  # every compiler refusal is a finding to record, whatever its class
        record.update(shared=None, regs=None, stack=None, spill_stores=None, spill_loads=None,
                      error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}")
    record["seconds"] = round(time.perf_counter() - started, 2)
    record["fits"] = record["error"] is None and record["shared"] <= shared_limit(target)
    return record


def _compile_item(item):
    name, variant, dtype, config, target = item  # specs hold JIT functions, which do not pickle
    return compile_one(next(s for s in SPECS if s.name == name), variant, dtype, config, target)


def load_recorded(path: Path = RECORDED_TABLE) -> dict:
    if not path.exists():
        return {}
    return {(r["kernel"], r["variant"], r["dtype"], r["config"], r["target"]): r
            for r in json.loads(path.read_text())["rows"]}


def is_current(record: dict | None, spec: KernelSpec) -> bool:
    return (record is not None and record["source"] == source_hash(spec.kernel)
            and record["triton"] == triton.__version__)


def compile_all(items, jobs: int, progress=True) -> list[dict]:
    records = []
    started = time.perf_counter()
    if jobs > 1 and len(items) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            iterator = pool.map(_compile_item, [(s.name, *rest) for s, *rest in items], chunksize=1)
            for index, record in enumerate(iterator, 1):
                records.append(record)
                _report(progress, index, len(items), record, started)
    else:
        for index, item in enumerate(items, 1):
            records.append(compile_one(*item))
            _report(progress, index, len(items), records[-1], started)
    return records


def _report(progress, index, total, record, started):
    if progress:
        state = record["error"] or f"shared {record['shared']}, regs {record['regs']}, spills {record['spill_stores']}"
        print(f"[{index}/{total} {time.perf_counter() - started:.0f}s] {record['kernel']} {record['variant']} "
              f"{record['dtype']} {record['config']} sm_{record['target']}: {state} ({record['seconds']}s)",
              file=sys.stderr, flush=True)


def write_table(records: list[dict], path: Path = RECORDED_TABLE) -> None:
    order = {key_of(*c): i for i, c in enumerate(combinations())}
    rows = sorted(records, key=lambda r: order[(r["kernel"], r["variant"], r["dtype"], r["config"], r["target"])])
    fields = ("kernel", "variant", "dtype", "config", "target", "shared", "regs", "stack", "spill_stores",
              "spill_loads", "fits", "error", "source", "triton", "seconds")
    lines = [json.dumps({f: r[f] for f in fields}) for r in rows]
    path.write_text('{"command": "python -m llmquant_kernels.aot --write",\n "rows": [\n' + ",\n".join(lines) + "\n]}\n")


def sample(items: list, recorded: dict) -> list:
    """A few combinations per kernel and target, for the fast suite: the fitting configuration that
    needs the most shared memory (the edge of the launcher's filter), and each variant once, in the
    last dtype, at the configuration that compiles fastest."""
    chosen = {}
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault((item[0].name, item[4]), []).append(item)
    for group in groups.values():
        records = [(item, recorded.get(key_of(*item))) for item in group]
        fitting = [(item, r) for item, r in records if r and r["fits"]]
        if fitting:
            edge = max(fitting, key=lambda pair: pair[1]["shared"])[0]
            chosen[key_of(*edge)] = edge
        spec = group[0][0]
        for variant in spec.variants:
            mine = [(item, r) for item, r in records if item[1] == variant and item[2] == spec.dtypes[-1]]
            cheapest = min(mine, key=lambda pair: pair[1]["seconds"] if pair[1] else 0)[0]
            chosen[key_of(*cheapest)] = cheapest
    return list(chosen.values())


def device_limits_standing_for(spec: KernelSpec, target: int) -> list[int]:
    """The shared memory of every GPU whose launches read this target's records (sm_80's stand for
    A100 and for the 99 KB sm_86 / sm_89 parts as well)."""
    return sorted({limit for capability, limit in SHARED_MEMORY_PER_BLOCK.items()
                   if recorded_target(capability, spec.targets) == target})


def coverage_problems(recorded: dict) -> list[str]:
    """What would leave a launcher without a configuration: a recorded compile error, or a shape
    class (or, for kernels launched with one fixed configuration per shape, any configuration)
    with nothing that fits a GPU its target's records stand for."""
    problems = []
    for spec in SPECS:
        for variant in spec.variants:
            for dtype in spec.dtypes:
                for target in spec.targets:
                    def record(config):
                        return recorded.get((spec.name, variant, dtype, config_id(config), target))

                    for config in spec.gpu_configs():
                        r = record(config)
                        if r is not None and r["error"]:
                            problems.append(f"{spec.name} {variant} {dtype} {config_id(config)} sm_{target}: {r['error']}")
                    for limit in device_limits_standing_for(spec, target):
                        if spec.configs:  # no tuning: every configuration must launch
                            classes = [[c] for c in spec.configs]
                        else:
                            classes = [spec.candidates(m) for m in ((1, 2, 4, 8) if spec.space == "gemv" else (1, 64, 512))]
                        for candidates in classes:
                            if not any((record(c) or {}).get("shared", limit + 1) <= limit for c in candidates):
                                problems.append(f"{spec.name} {variant} {dtype} sm_{target} at {limit // 1024} KB: nothing "
                                                f"fits among {', '.join(config_id(c) for c in candidates)}")
    return problems


def markdown(records: list[dict]) -> str:
    """The compile-proof section of KERNELS.md: a summary per kernel and target, then one row per
    kernel x configuration x target (the worst over its variants and dtypes), then every
    combination that does not fit."""
    by_key = {(r["kernel"], r["variant"], r["dtype"], r["config"], r["target"]): r for r in records}
    specs = [s for s in SPECS if any(r["kernel"] == s.name for r in records)]
    triton_versions = sorted({r["triton"] for r in records})
    targets = sorted({r["target"] for r in records})
    total = len(records)
    compiled = sum(r["error"] is None for r in records)
    fits = sum(bool(r["fits"]) for r in records)
    lines = [MARKERS[0], "", "## Compile proof: every kernel, launch candidate, dtype and GPU target", "",
             "    python -m llmquant_kernels.aot --write --markdown eval/KERNELS.md   # (re)compile what changed",
             "    python -m llmquant_kernels.aot --check                              # recompile all, compare", "",
             f"Compiled ahead of time on a CPU with Triton {', '.join(triton_versions)} (its own ptxas) for "
             + ", ".join(f"sm_{t} ({shared_limit(t) // 1024} KB shared per block)" for t in targets)
             + f". {total} kernel x variant x dtype x configuration x target combinations: {compiled} compile, "
             f"{fits} fit their target's shared memory; the launcher drops the other {total - fits} on that target "
             "before tuning (kernels/llmquant_kernels/compiled.json, read by _launch.launchable). "
             "Registers and spills are ptxas's (-v); a spill is bytes stored to local memory per thread.", "",
             "| kernel | variants | dtypes | configs | targets | combinations | compile | fit | dropped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        rows = [r for r in records if r["kernel"] == spec.name]
        dropped = {}
        for r in rows:
            if not r["fits"]:
                dropped.setdefault(f"sm_{r['target']}", 0)
                dropped[f"sm_{r['target']}"] += 1
        lines.append(f"| {spec.name} | {', '.join(spec.variants)} | {', '.join(spec.dtypes)} | {len(spec.gpu_configs())} | "
                     f"{', '.join(f'sm_{t}' for t in spec.targets)} | {len(rows)} | {sum(r['error'] is None for r in rows)} | "
                     f"{sum(bool(r['fits']) for r in rows)} | "
                     f"{', '.join(f'{n} on {t}' for t, n in sorted(dropped.items())) or 'none'} |")
    lines += ["", "Per kernel x configuration x target, the worst over the kernel's variants and dtypes: KB of "
              "shared memory, registers per thread, bytes of spill stores per thread. fits: how many of its "
              "variant x dtype combinations fit the target's shared memory (and, for sm_80, that of the 99 KB "
              "sm_86 / sm_89 parts, whose launches read sm_80's records); dropped: those that do not.", "",
              "| kernel | config (m n k split warps stages) | target | shared KB | regs | spill bytes | fits | dropped |",
              "|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        for config in spec.gpu_configs():
            for target in spec.targets:
                group = [by_key[k] for k in ((spec.name, v, d, config_id(config), target)
                                             for v in spec.variants for d in spec.dtypes) if k in by_key]
                if not group:
                    continue
                ok = [r for r in group if r["error"] is None]
                shared = max((r["shared"] for r in ok), default=None)
                regs = max((r["regs"] or 0 for r in ok), default=None)
                spills = max((r["spill_stores"] or 0 for r in ok), default=None)
                fits = []
                for limit in sorted(device_limits_standing_for(spec, target), reverse=True):
                    fitting = sum(r["error"] is None and r["shared"] <= limit for r in group)
                    fits.append(f"{fitting}/{len(group)}" + ("" if limit == shared_limit(target) else f" at {limit // 1024} KB"))
                dropped = [r for r in group if not r["fits"]]
                lines.append(f"| {spec.name} | {config_id(config)} | sm_{target} | "
                             f"{'–' if shared is None else f'{shared / 1024:.1f}'} | {regs if regs is not None else '–'} | "
                             f"{spills if spills is not None else '–'} | {'; '.join(fits)} | {_which(spec, dropped)} |")
    errors = [r for r in records if r["error"]]
    lines += ["", f"Compile errors: {len(errors)}."]
    lines += [f"- {r['kernel']} {r['variant']} {r['dtype']} {r['config']} sm_{r['target']}: {r['error']}" for r in errors]
    lines += ["", MARKERS[1]]
    return "\n".join(lines) + "\n"


def _which(spec: KernelSpec, rows: list[dict]) -> str:
    """Variants (with their dtypes, unless all) of some records, briefly."""
    by_variant: dict[str, list[str]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r["dtype"])
    return ", ".join(v if len(d) == len(spec.dtypes) else f"{v} ({', '.join(d)})" for v, d in by_variant.items())


def write_markdown(records: list[dict], path: Path) -> None:
    """Replace the compile-proof section of `path` (kept in place between its markers), or put it
    first, above what the file already says."""
    text = path.read_text() if path.exists() else ""
    section = markdown(records)
    if MARKERS[0] in text and MARKERS[1] in text:
        before = text[:text.index(MARKERS[0])]
        after = text[text.index(MARKERS[1]) + len(MARKERS[1]):].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        title, _, rest = text.partition("\n")
        text = (title + "\n\n" + section + "\n" + rest.lstrip("\n")) if text else section
    path.write_text(text)


def check(records: list[dict], recorded: dict) -> list[str]:
    """What is wrong: a compile error, or numbers that differ from the recorded table."""
    problems = []
    for r in records:
        key = (r["kernel"], r["variant"], r["dtype"], r["config"], r["target"])
        if r["error"]:
            problems.append(f"{' '.join(map(str, key))}: {r['error']}")
            continue
        old = recorded.get(key)
        if old is None:
            problems.append(f"{' '.join(map(str, key))}: not in {RECORDED_TABLE.name}")
        elif (old["shared"], old["regs"], old["spill_stores"]) != (r["shared"], r["regs"], r["spill_stores"]):
            problems.append(f"{' '.join(map(str, key))}: recorded shared/regs/spills "
                            f"{old['shared']}/{old['regs']}/{old['spill_stores']}, compiled now "
                            f"{r['shared']}/{r['regs']}/{r['spill_stores']}")
    return problems


def stale(recorded: dict) -> list[str]:
    """Combinations the launcher can choose whose record is missing or from other kernel source or Triton."""
    return [" ".join(map(str, key_of(*c))) for c in combinations() if not is_current(recorded.get(key_of(*c)), c[0])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="compile what is missing or stale, rewrite compiled.json")
    parser.add_argument("--check", action="store_true", help="compile and compare with compiled.json; fail on "
                        "any compile error, any difference, any stale record")
    parser.add_argument("--sample", action="store_true", help="with --check: a few combinations per kernel and target")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (by spec name)")
    parser.add_argument("--markdown", type=Path, help="rewrite the compile-proof section of this file")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--json", type=Path, help="also write the records compiled in this run here")
    args = parser.parse_args(argv)
    recorded = load_recorded()
    items = [c for c in combinations() if not args.kernels or c[0].name in args.kernels]
    if args.write:
        todo = [c for c in items if not is_current(recorded.get(key_of(*c)), c[0])]
        print(f"{len(items)} combinations, {len(todo)} to compile", file=sys.stderr)
        fresh = compile_all(todo, args.jobs)
        merged = dict(recorded)
        merged.update({(r["kernel"], r["variant"], r["dtype"], r["config"], r["target"]): r for r in fresh})
        wanted = {key_of(*c) for c in combinations()}
        write_table([r for k, r in merged.items() if k in wanted])
        recorded = load_recorded()
        if args.json:
            args.json.write_text(json.dumps(fresh, indent=1) + "\n")
    problems = []
    if args.check:
        out_of_date = stale(recorded)
        if out_of_date:
            problems.append(f"{len(out_of_date)} combinations have no current record (kernel source or Triton "
                            f"changed; run python -m llmquant_kernels.aot --write), e.g. {out_of_date[0]}")
        problems += coverage_problems(recorded)
        todo = sample(items, recorded) if args.sample else items
        print(f"checking {len(todo)} of {len(items)} combinations", file=sys.stderr)
        fresh = compile_all(todo, args.jobs)
        problems += check(fresh, recorded)
        if args.json:
            args.json.write_text(json.dumps(fresh, indent=1) + "\n")
    if args.markdown:
        write_markdown(list(recorded.values()), args.markdown)
    for problem in problems:
        print("PROBLEM:", problem)
    if not (args.write or args.check or args.markdown):
        parser.error("nothing to do: give --write, --check or --markdown")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
