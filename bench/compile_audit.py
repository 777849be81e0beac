"""Compile every Triton kernel the model launches, at every GPU autotune config, for a GPU that is not here.

The interpreter (CI) runs the kernels' arithmetic but checks nothing a GPU compile checks: ``tl.dot``
shape limits, shared memory, registers, whether a GEMM lowers to Hopper ``wgmma``. This script closes
that gap on any machine with Triton's NVIDIA backend (its wheel ships ``ptxas``), GPU or not:

1. a stand-in driver reports the target (default sm_90, the H100/H200), so ``kernel[grid](...)``
   compiles for it; every launch is turned into a compile-only warmup (nothing runs);
2. an autotuned launch compiles *every* config (the autotuner would benchmark them on a GPU);
3. the workloads run the real model (v1 and face-parsing presets, ResNet-18 and -50) on CPU tensors
   with ``backend="triton"``: eval ``aux_mode="pred"`` and ``"eval"``, and a train-mode forward +
   backward, in each dtype; so the kernels compiled are the specialisations the model launches. Shapes
   are small, so integer arguments divide by 16 differently from a full-size run, and on CPU tensors
   the reductions' split plan (``split_plan``: CHUNK/SPLIT, part of some autotune keys) takes its
   non-CUDA branch; neither changes which kernels and configs are compiled.

Per compiled kernel it records registers, spilled bytes (``LOCAL``/``STACK`` from ``cuobjdump``),
shared memory, which MMA instructions the PTX holds, and the width of its global loads/stores. It exits
1 when a kernel fails to compile or needs more shared memory than the target has (a launch would fail),
and with ``--strict`` also on any spill inside a loop (``LDL``/``STL`` between a backward branch and
its target in the SASS).
Outputs are a markdown summary (stdout or ``--md``) and the full list (``--json``).

Usage (from the repository root; must be its own process, with ``TRITON_INTERPRET`` unset):
    python bench/compile_audit.py [--arch 90] [--dtypes bf16,fp16,fp32] [--quick] [--configs all|first]
                                  [--strict] [--only TEXT] [--json F] [--md F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("compile_audit needs triton imported without TRITON_INTERPRET: run it as its own process")
os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
"""Opt-in shared memory per block (bytes) by compute capability (CUDA programming guide)."""


@dataclass
class Compiled:
    """One compiled kernel variant."""

    kernel: str
    workload: str
    config: dict[str, int]
    flags: dict[str, object]
    dtypes: list[str]
    registers: int = -1
    spill_bytes: int = -1
    loop_spills: int = -1
    mma_loop: list[int] = field(default_factory=list)
    """``[instructions, MMA instructions]`` of the tensor-core main loop, empty without one."""
    shared_bytes: int = -1
    mma: list[str] = field(default_factory=list)
    global_access: dict[str, int] = field(default_factory=dict)
    compile_s: float = 0.0
    error: str | None = None


class TargetDriver:
    """The least of a Triton driver that compile-only launches touch: the target, device 0, stream 0."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


class Recorder:
    """Turns launches into compile-only warmups and records each newly compiled variant."""

    def __init__(self, all_configs: bool = True) -> None:
        self.all_configs = all_configs
        self.records: list[Compiled] = []
        self.seen: set[str] = set()
        self.workload = ""
        self._jit_run = JITFunction.run

    def install(self) -> None:
        recorder = self

        def jit_run(fn: JITFunction, *args, grid, warmup, **kwargs):  # warmup: always compile-only
            t0 = time.perf_counter()
            try:
                kernel = recorder._jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # a compile error is a finding: recorded and reported
                recorder.add(fn, args, kwargs, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
                return None
            recorder.add(fn, args, kwargs, kernel, time.perf_counter() - t0, None)
            return kernel

        def autotuned_run(tuner: Autotuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            configs = tuner.prune_configs(kwargs)
            for config in configs if recorder.all_configs else configs[:1]:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        JITFunction.run = jit_run
        Autotuner.run = autotuned_run

    def add(self, fn: JITFunction, args: tuple, kwargs: dict, kernel, seconds: float, error: str | None) -> None:
        params = [p.name for p in fn.params]
        bound = dict(zip(params, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
        config = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "GROUP")) or k == "ONE_LOOP"}
        config |= {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        flags = {p.name: bound[p.name] for p in fn.params
                 if p.is_constexpr and p.name in bound and p.name not in config}
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in bound.values() if isinstance(v, torch.Tensor)})
        key = kernel.hash if kernel is not None else f"{fn.__name__}:{config}:{flags}:{dtypes}:{error}"
        if key in self.seen:
            return
        self.seen.add(key)
        rec = Compiled(fn.__name__, self.workload, config, flags, dtypes, compile_s=round(seconds, 3), error=error)
        if kernel is not None:
            rec.shared_bytes = int(kernel.metadata.shared)
            rec.registers, rec.spill_bytes = resource_usage(kernel.asm["cubin"])
            loops = loop_stats(kernel.asm["cubin"])
            rec.loop_spills = loops.spills
            rec.mma_loop = [loops.mma_loop_instructions, loops.mma_loop_mmas] if loops.mma_loop_mmas else []
            ptx = kernel.asm["ptx"]
            rec.mma = [m for m, pat in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"),
                                        ("cp.async", "cp.async.")) if pat in ptx]
            rec.global_access = access_widths(ptx)
        self.records.append(rec)


def access_widths(ptx: str) -> dict[str, int]:
    """Global loads/stores in the PTX by bytes per thread, e.g. ``{"ld16": 32, "st4": 1}`` (static counts).

    Memory-bound kernels want 16-byte vectors; 2-4 byte accesses there mean a layout or mask that the
    compiler could not prove contiguous and aligned (``cp.async`` copies of tl.dot operands not counted).
    """
    counts: dict[str, int] = {}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[\w:]+?)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        key = f"{op}{int(vec or 1) * int(bits) // 8}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, spilled bytes)`` of a cubin, from the ``cuobjdump`` shipped with Triton."""
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", _cuobjdump(cubin, "--dump-resource-usage"))}
    return usage.get("REG", -1), usage.get("STACK", 0) + usage.get("LOCAL", 0)


@dataclass
class LoopStats:
    """What the SASS loops hold: spills, and the shape of the tensor-core main loop."""

    spills: int
    """``LDL``/``STL`` inside any loop."""
    mma_loop_instructions: int
    """Instructions of the innermost loop issuing ``HGMMA``/``HMMA`` (0 if none): per-iteration overhead."""
    mma_loop_mmas: int
    """Tensor-core instructions in that loop."""


def loop_stats(cubin: bytes) -> LoopStats:
    """Loops are backward branches' ranges in the SASS. Spills outside loops (prologue, epilogue: once per
    program) cost little; inside the main loop they cost on every iteration. The tensor-core loop's
    instruction count per MMA says how much issue bandwidth the gathers, masks and pipelining take."""
    sass = [(int(a, 16), ins.strip()) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);",
                                                             _cuobjdump(cubin, "-sass"))]
    loops = [(int(m.group(1), 16), a) for a, ins in sass
             if (m := re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)) and int(m.group(1), 16) < a]

    def opcode(ins: str) -> str:
        return re.sub(r"^@!?U?P\w+\s+", "", ins).split(".")[0].split()[0]

    spills = sum(1 for a, ins in sass if opcode(ins) in ("LDL", "STL") and any(lo <= a <= hi for lo, hi in loops))
    mma = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and opcode(ins) in ("HGMMA", "HMMA") for a, ins in sass)]
    if not mma:
        return LoopStats(spills, 0, 0)
    lo, hi = min(mma, key=lambda r: r[1] - r[0])
    body = [opcode(ins) for a, ins in sass if lo <= a <= hi]
    return LoopStats(spills, len(body), sum(op in ("HGMMA", "HMMA") for op in body))


def _inference_modes(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The model's eval and pred forwards (no grad) on ``x``."""
    model.eval()
    with torch.no_grad():
        for mode in ("eval", "pred"):
            model.aux_mode = mode
            model(x)


def workloads(dtypes: list[str], quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(name, run)`` pairs; each run drives the model through every kernel it launches."""
    from fastbisenet import BiSeNet
    from fastbisenet.ops import fused

    cases = [("v1", "resnet18"), ("face-parsing", "resnet18")]
    if not quick:
        cases.append(("v1", "resnet50"))
    for preset, backbone in cases:
        for name in dtypes:
            dtype = DTYPES[name]

            def run(preset: str = preset, backbone: str = backbone, dtype: torch.dtype = dtype) -> None:
                torch.manual_seed(0)
                model = BiSeNet(19, "train", preset=preset, backbone=backbone, backend="triton")
                model = model.to(dtype=dtype, memory_format=torch.channels_last)
                x = torch.randn(2, 3, 96, 160).to(dtype)  # the user's NCHW image, as the first conv reads it
                model.train()
                labels = torch.randint(0, 19, (2, 96, 160))
                labels[:, :4] = 255
                # the training loss as `fastbisenet train` computes it: fused heads + per-pixel CE
                sum(loss.mean() for loss in model(x, labels, ignore_index=255)).backward()
                # a loss of the logits (model(x) in training): the head logits kernels, backward included,
                # and OhemCELoss's per-pixel CE kernels
                head = model.conv_out16
                feat = torch.randn(2, 64, 12, 20).to(dtype=dtype, memory_format=torch.channels_last)
                logits = fused.head_logits(feat.requires_grad_(), head.conv_out, (96, 160), head.align_corners)
                fused.cross_entropy(logits, labels, 255).mean().backward()
                _inference_modes(model, x[:1])

            yield f"{preset}/{backbone}/{name}", run

    def large_map_statistics() -> None:
        """The BN reductions' parallel level runs only past PARTIALS_CHUNK slots (maps far larger than above)."""
        from fastbisenet.kernels import conv_bn as K

        slots, c = 3 * K.PARTIALS_CHUNK, 96
        part = torch.rand(2, slots, c)
        K.bn_stats(part, 64 * slots, 64, 1e-5, torch.ones(c))
        K.bn_bwd_coefficients(part, 64 * slots, torch.ones(c), torch.ones(c), batch_stats=True,
                              dgamma_dtype=torch.float32, dbeta_dtype=torch.float32)

    yield "bn-statistics/large-map", large_map_statistics

    for name in dtypes:
        def triton_dgrad(dtype: torch.dtype = DTYPES[name]) -> None:
            """The Triton dgrad candidate (ops.conv_bn.conv_input_grad): the forward kernel as a plain conv on
            output gradients, at the model's stride-1 kernel sizes (3x3 and 1x1)."""
            from fastbisenet.ops.conv_bn import conv_input_grad

            for c_out, c_in, k in ((64, 64, 3), (128, 256, 3), (128, 64, 1)):
                g = torch.randn(2, c_out, 12, 20).to(dtype=dtype, memory_format=torch.channels_last)
                conv_input_grad(g, torch.randn(c_out, c_in, k, k), (k // 2, k // 2))

        yield f"triton-dgrad/{name}", triton_dgrad

    for name in dtypes:
        def one_pixel_maps(dtype: torch.dtype = DTYPES[name]) -> None:
            """Maps 1 pixel high or wide: the JIT specialises an int argument equal to 1 into a Python int, so
            ``H.to(...)`` on it fails to compile while the interpreter (CI's tests) never notices. Every conv
            K-loop form (ROW_K and flattened stems, nested, ONE_LOOP: C_in = 32 keeps only that form), then
            the whole model on a 32x32 input (the 1/32 maps are 1x1), train and inference."""
            from fastbisenet.kernels import conv_bn as K

            from fastbisenet import BiSeNet

            row_loop = K.STEM_ROW_LOOP
            try:
                for K.STEM_ROW_LOOP in (True, False):
                    for h, w in ((1, 5), (5, 1), (1, 1)):
                        x = torch.randn(1, 3, h, w).to(dtype)
                        K.conv_bn_fwd(x, torch.randn(147, 64).to(dtype), (7, 7), (2, 2), (3, 3), relu=True)
            finally:
                K.STEM_ROW_LOOP = row_loop
            for c_in in (32, 64):
                for h, w in ((1, 5), (5, 1), (1, 1)):
                    x = torch.randn(1, c_in, h, w).to(dtype=dtype, memory_format=torch.channels_last)
                    K.conv_bn_fwd(x, torch.randn(9 * c_in, 64).to(dtype), (3, 3), (1, 1), (1, 1), relu=True)
            torch.manual_seed(0)
            model = BiSeNet(19, "train", backend="triton").to(dtype=dtype, memory_format=torch.channels_last)
            x = torch.randn(2, 3, 32, 32).to(dtype)
            labels = torch.randint(0, 19, (2, 32, 32))
            sum(loss.mean() for loss in model(x, labels, ignore_index=255)).backward()
            _inference_modes(model, x[:1])

        yield f"one-pixel-maps/{name}", one_pixel_maps

    for name in dtypes:
        def upsample_modes(dtype: torch.dtype = DTYPES[name]) -> None:
            """``ops.attend_add_upsample`` in the modes no preset uses (bilinear, align_corners False/True: the
            paper's context path), forward and backward, broadcast and full ``other``, at 2x."""
            from fastbisenet.ops.attend_add_upsample import attend_add_upsample

            for align in (False, True):
                for full in (False, True):
                    x = torch.randn(2, 128, 12, 20).to(dtype=dtype, memory_format=torch.channels_last)
                    a = torch.rand(2, 128, 1, 1).to(dtype)
                    other = (torch.randn(2, 128, 12, 20).to(dtype=dtype, memory_format=torch.channels_last)
                             if full else torch.randn(2, 128, 1, 1).to(dtype))
                    out = attend_add_upsample(x.requires_grad_(), a.requires_grad_(), other.requires_grad_(),
                                              (24, 40), "bilinear", align)
                    out.sum().backward()

        yield f"upsample-modes/{name}", upsample_modes


def summarise(records: list[Compiled], arch: int) -> list[dict]:
    """One row per kernel and config: variants compiled, worst registers/spills/shared memory, MMA kinds."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.kernel, json.dumps(r.config, sort_keys=True))
        row = rows.setdefault(key, {"kernel": r.kernel, "config": r.config, "variants": 0, "errors": 0,
                                    "max_registers": 0, "max_spill_bytes": 0, "max_loop_spills": 0,
                                    "max_shared_bytes": 0, "max_loop_instr_per_mma": 0.0,
                                    "mma": set(), "access": set(), "compile_s": 0.0})
        row["variants"] += 1
        row["compile_s"] += r.compile_s
        if r.error:
            row["errors"] += 1
            continue
        row["max_registers"] = max(row["max_registers"], r.registers)
        row["max_spill_bytes"] = max(row["max_spill_bytes"], r.spill_bytes)
        row["max_loop_spills"] = max(row["max_loop_spills"], r.loop_spills)
        if r.mma_loop:
            row["max_loop_instr_per_mma"] = max(row["max_loop_instr_per_mma"], round(r.mma_loop[0] / r.mma_loop[1], 1))
        row["max_shared_bytes"] = max(row["max_shared_bytes"], r.shared_bytes)
        row["mma"] |= set(r.mma)
        row["access"] |= set(r.global_access)
    out = sorted(rows.values(), key=lambda d: (d["kernel"], json.dumps(d["config"], sort_keys=True)))
    for row in out:
        row["mma"] = sorted(row["mma"])
        row["access"] = sorted(row["access"], key=lambda k: (k[:2], int(k[2:])))
        row["compile_s"] = round(row["compile_s"], 2)
        row["over_shared_limit"] = row["max_shared_bytes"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[90])
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Compile audit: sm_{meta['arch']}, triton {meta['triton']}, torch {meta['torch']}",
        "",
        f"Compiled on a machine without a GPU ({meta['host']}), {meta['date']}, commit {meta['commit']}. "
        f"Workloads: {', '.join(meta['workloads'])}; {meta['configs']} autotune configs. "
        f"{meta['compiled']} kernel variants in {meta['seconds']:.0f} s. Registers are per thread; spills are "
        "local-memory bytes per thread; spills in loops count the LDL/STL instructions inside a loop of "
        "the SASS (spills elsewhere run once per program). Main-loop instr / MMA: SASS instructions per "
        "tensor-core instruction in the innermost loop that issues them (the gather/mask/pipeline overhead "
        "a warp issues per MMA). Access widths: the `ld`/`st` global accesses in "
        "the PTX by bytes per thread (16 = full vectors; tl.dot operands copied by cp.async not listed).",
        "",
        "| kernel | config | variants | errors | max regs | max spill B | max spills in loops | max smem KiB | MMA "
        "| main-loop instr / MMA (max) | global access widths (B) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        cfg = " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_')}={v}" for k, v in r["config"].items())
        cells = [r["kernel"], cfg, r["variants"], r["errors"], r["max_registers"], r["max_spill_bytes"],
                 r["max_loop_spills"], f"{r['max_shared_bytes'] / 1024:.1f}", ", ".join(r["mma"]) or "-",
                 r["max_loop_instr_per_mma"] or "-", " ".join(r["access"]) or "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    if os.environ.get("FASTBISENET_GIT_COMMIT"):
        return os.environ["FASTBISENET_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (default 90)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 presets only")
    parser.add_argument("--configs", choices=("all", "first"), default="all",
                        help="compile every autotune config (default) or only each kernel's first")
    parser.add_argument("--strict", action="store_true", help="also fail on any spill inside a loop")
    parser.add_argument("--json", type=Path, help="write every compiled variant and the summary here")
    parser.add_argument("--md", type=Path, help="write the markdown summary here (default: stdout)")
    parser.add_argument("--only", metavar="TEXT", help="run only the workloads whose name contains TEXT")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if bad := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")

    commit = git_commit()  # now: the code compiled is what is checked out when the run starts
    if commit != "unknown" and not os.environ.get("FASTBISENET_GIT_COMMIT"):
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=Path(__file__).parent)
        if status.stdout.strip():
            commit += " + uncommitted changes"
    driver.set_active(TargetDriver(args.arch))
    recorder = Recorder(all_configs=args.configs == "all")
    recorder.install()
    from fastbisenet.kernels import conv_bn

    import fastbisenet.ops

    fastbisenet.ops.interpreter_enabled = lambda: True  # let backend="triton" take CPU tensors
    conv_bn.dot_precision = lambda x: "tf32"  # what a GPU uses for fp32 convs by default
    t0 = time.perf_counter()
    names = []
    for name, run in workloads(dtypes, args.quick):
        if args.only and args.only not in name:
            continue
        recorder.workload = name
        names.append(name)
        run()
    rows = summarise(recorder.records, args.arch)
    meta = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
            "host": platform.machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": commit, "workloads": names, "configs": args.configs, "compiled": len(recorder.records),
            "seconds": time.perf_counter() - t0}
    text = markdown(rows, meta)
    if args.md:
        args.md.write_text(text)
    else:
        print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": rows,
                                         "variants": [asdict(r) for r in recorder.records]}, indent=1, default=str))
    failures = [f"{r.kernel} {r.config} {r.flags}: {r.error}" for r in recorder.records if r.error]
    failures += [f"{r['kernel']} {r['config']}: {r['max_shared_bytes']} B shared memory is over the sm_{args.arch} "
                 f"limit" for r in rows if r["over_shared_limit"]]
    if args.strict:
        failures += [f"{r['kernel']} {r['config']}: {r['max_loop_spills']} spill instructions in a loop"
                     for r in rows if r["max_loop_spills"] > 0]
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
