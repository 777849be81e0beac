"""The benchmark report.

:func:`report` turns pytest-benchmark JSONs (:func:`load_rows`) into ``report.md`` (:func:`render_markdown`:
environment, L2 state, geometric-mean speedups of fastbisenet, a table per op and per end-to-end group,
autotune choices) and ``end_to_end.png`` (:func:`plot_end_to_end`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastbisenet.benchmark._common import VARIANTS, shape_str
from fastbisenet.benchmark.timing import CACHE_MODES


@dataclass
class Row:
    group: str
    name: str
    time_s: float
    info: dict[str, Any]

    @property
    def variant(self) -> str:
        return self.info.get("variant", self.name)


def load_rows(json_path: str | Path | Sequence[str | Path]) -> tuple[list[Row], dict[str, Any]]:
    """Benchmark rows (median time) and the file's machine/commit info; for several files (the stages of one
    suite run), their rows in order, the first file's info and every file's autotune choices."""
    if not isinstance(json_path, (str, Path)):
        paths = list(json_path)
        if not paths:
            raise ValueError("no benchmark JSON given")
        rows, meta = load_rows(paths[0])
        choices = _autotune_of(meta, staged=True)
        for path in paths[1:]:
            more_rows, more_meta = load_rows(path)
            rows += more_rows
            choices += [c for c in _autotune_of(more_meta, staged=True) if c not in choices]
        if choices:
            meta["machine_info"] = {**meta["machine_info"],
                                    "fastbisenet": {**meta["machine_info"].get("fastbisenet", {}), "autotune": choices}}
        return rows, meta
    data = json.loads(Path(json_path).read_text())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{json_path} is not a pytest-benchmark JSON (pytest bench/ --benchmark-only "
                         "--benchmark-json FILE); a 'fastbisenet bench --json' file holds its table already")
    rows = [Row(b.get("group") or b["name"], b["name"], float(b["stats"]["median"]), b.get("extra_info") or {})
            for b in data.get("benchmarks", [])]
    meta = {"datetime": data.get("datetime"), "machine_info": data.get("machine_info", {}),
            "commit_info": data.get("commit_info", {})}
    return rows, meta


def _autotune_of(meta: dict[str, Any], *, staged: bool = False) -> list[dict[str, Any]]:
    """A JSON's autotune choices as a list (an ``{"error": ...}`` kept as one entry); ``staged``: each tagged
    with the file's benchmark stages."""
    info = meta.get("machine_info", {}).get("fastbisenet", {})
    choices = info.get("autotune") or []
    choices = [choices] if isinstance(choices, dict) else list(choices)
    stage = "/".join(info.get("stages") or [])
    return [{**c, "stage": stage} for c in choices] if staged and stage else choices


def floor_seconds(flops: float, nbytes: float, tflops: float | None, gbps: float | None) -> float | None:
    """Speed-of-light time: max(FLOPs / matmul rate, bytes / copy bandwidth)."""
    if not tflops or not gbps:
        return None
    return max(flops / (tflops * 1e12), nbytes / (gbps * 1e9))


def row_metrics(row: Row) -> dict[str, float | None]:
    """Achieved GB/s and TFLOP/s, floor time and % of floor (floor / time) of one row."""
    i, t = row.info, row.time_s
    flops, nbytes = i.get("flops") or 0, i.get("bytes") or 0
    floor = floor_seconds(flops, nbytes, i.get("floor_matmul_tflops"), i.get("floor_copy_gbps"))
    return {
        "ms": t * 1e3,
        "gbps": nbytes / t / 1e9 if t > 0 else None,
        "tflops": flops / t / 1e12 if t > 0 else None,
        "floor_ms": floor * 1e3 if floor is not None else None,
        "pct_floor": 100 * floor / t if floor is not None and t > 0 else None,
    }


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else format(v, spec) + suffix


def _variant_rank(v: str) -> int:
    return VARIANTS.index(v) if v in VARIANTS else len(VARIANTS)


def duplicate_rows(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(group, variant) pairs that more than one row claims (the report uses the first of each)."""
    seen: set[tuple[str, str]] = set()
    dups: list[tuple[str, str]] = []
    for r in rows:
        key = (r.group, r.variant)
        if key in seen and key not in dups:
            dups.append(key)
        seen.add(key)
    return dups


def speedups(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Per group: {peer variant: peer time / fastbisenet time} (the first row of a duplicated variant)."""
    out: dict[str, dict[str, float]] = {}
    by_group: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_group.setdefault(r.group, {}).setdefault(r.variant, r)
    for g, vs in by_group.items():
        fast = vs.get("fastbisenet")
        if fast is None or fast.time_s <= 0:
            continue
        out[g] = {v: r.time_s / fast.time_s for v, r in vs.items() if v != "fastbisenet"}
    return out


def render_markdown(rows: Sequence[Row], meta: dict[str, Any] | None = None) -> str:
    """The markdown report: environment, geometric-mean speedups, one table per group."""
    meta = meta or {}
    lines = ["# fastbisenet benchmark report", ""]
    first = rows[0].info if rows else {}
    env_keys = ("device_name", "torch", "triton", "cuda", "cudnn", "git_commit")
    lines += [f"- {k}: `{first.get(k)}`" for k in env_keys if k in first]
    if meta.get("datetime"):
        lines.append(f"- date: `{meta['datetime']}`")
    if first.get("floor_matmul_tflops"):
        lines.append(f"- measured floors: bf16 matmul {first['floor_matmul_tflops']:.1f} TFLOP/s, "
                     f"copy {first.get('floor_copy_gbps') or 0:.0f} GB/s (read + write)")
    lines += cache_lines(rows)
    lines += ["", "Times are medians of per-iteration device time. Speedup = peer time / fastbisenet time. "
              "floor = max(FLOPs / matmul rate, bytes / copy bandwidth); % of floor = floor / time.", ""]
    if not rows:
        return "\n".join([*lines, "_No benchmark rows._", ""])
    dups = duplicate_rows(rows)
    if dups:
        lines += [f"**Warning: {len(dups)} duplicate (group, variant) pair(s)**; each table and speedup uses the "
                  "first row of the pair: " + ", ".join(f"`{g}` / `{v}`" for g, v in dups), ""]
        first_rows = {}
        for r in rows:
            first_rows.setdefault((r.group, r.variant), r)
        rows = list(first_rows.values())

    sp = speedups(rows)
    by_op: dict[tuple[str, str, str], list[float]] = {}
    peers: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    group_info = {r.group: r.info for r in rows}
    for g, d in sp.items():
        i = group_info[g]
        key = (i.get("op", g), i.get("pass", ""), i.get("dtype", ""))
        by_op.setdefault(key, [])
        for v, s in d.items():
            peers.setdefault(key, {}).setdefault(v, []).append(s)
    if peers:
        peer_names = sorted({v for d in peers.values() for v in d}, key=_variant_rank)
        lines += ["## Summary: geometric-mean speedup of fastbisenet", "",
                  "| op | pass | dtype | " + " | ".join(f"vs {p}" for p in peer_names) + " |",
                  "|---|---|---|" + "---:|" * len(peer_names)]
        for key in sorted(peers):
            cells = []
            for p in peer_names:
                # a peer timed at 0 (a cold-L2 row within the flush's noise: samples clamp at 0) has no ratio
                vals = [v for v in peers[key].get(p, []) if v > 0]
                cells.append(f"{math.exp(statistics.fmean(math.log(v) for v in vals)):.2f}x ({len(vals)})"
                             if vals else "—")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        lines += ["", "(n) = number of shapes.", ""]

    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    ops_order: dict[str, list[str]] = {}
    for g, rs in groups.items():
        ops_order.setdefault(rs[0].info.get("op", "other"), []).append(g)
    for op in sorted(ops_order, key=lambda o: (o != "end_to_end", o)):
        lines += [f"## {op}", ""]
        if op == "end_to_end":
            for g in ops_order[op]:
                lines += _group_table(g, groups[g], sp.get(g, {}))
        else:
            lines += _op_table([groups[g] for g in ops_order[op]], sp)
    lines += autotune_lines(meta.get("machine_info", {}).get("fastbisenet", {}).get("autotune") or [])
    return "\n".join(lines)


def _group_table(group: str, rows: Sequence[Row], sp: dict[str, float]) -> list[str]:
    """Detailed table of one group: a line per variant."""
    rs = sorted(rows, key=lambda r: _variant_rank(r.variant))
    i = rs[0].info
    lines = [f"### {group}", "", f"{i.get('flops', 0) / 1e9:.3f} GFLOP, {i.get('bytes', 0) / 1e6:.2f} MB", "",
             "| variant | time (ms) | fastbisenet speedup | GB/s | TFLOP/s | floor (ms) | % of floor "
             "| peak mem (MiB; saved for backward) | timing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rs:
        m = row_metrics(r)
        s = sp.get(r.variant)
        speed = "—" if r.variant == "fastbisenet" or s is None else f"{s:.2f}x"
        mem = r.info.get("peak_mem_bytes")
        saved = r.info.get("saved_for_backward_bytes")
        mem_cell = _fmt(mem / 2**20 if mem else None, '.0f') + (f" (saved {saved / 2**20:.0f})" if saved else "")
        lines.append(
            f"| {r.variant} | {m['ms']:.4f} | {speed} | {_fmt(m['gbps'], '.1f')} | {_fmt(m['tflops'], '.2f')} | "
            f"{_fmt(m['floor_ms'], '.4f')} | {_fmt(m['pct_floor'], '.1f', '%')} | "
            f"{mem_cell} | {_timing(r)} |")
    return [*lines, ""]


def _timing(r: Row) -> str:
    t = r.info.get("timing") or ""
    t += " (graph capture failed)" if r.info.get("timing_note") else ""
    return f"{t}, {r.info['cache']}" if r.info.get("cache") else t


def cache_lines(rows: Sequence[Row]) -> list[str]:
    """Report lines saying in which L2 state each kind of row was timed (``extra_info["cache"]``)."""
    kinds: dict[str, dict[str, list[Row]]] = {}
    for r in rows:
        kind = "end-to-end rows" if r.info.get("op") == "end_to_end" or r.info.get("aux_mode") else "per-op rows"
        kinds.setdefault(kind, {}).setdefault(r.info.get("cache") or "unknown", []).append(r)
    lines = []
    for kind in sorted(kinds, key=lambda k: k != "per-op rows"):
        for mode, rs in sorted(kinds[kind].items()):
            text = CACHE_MODES.get(mode, "not recorded (rows from an older schema)")
            flush = [r.info["l2_flush_bytes"] for r in rs if r.info.get("l2_flush_bytes")]
            if flush:
                l2 = next((r.info["l2_bytes"] for r in rs if r.info.get("l2_bytes")), None)
                text += (f" (flush {max(flush) / 2**20:.0f} MiB; L2 "
                         + (f"{l2 / 2**20:.0f} MiB" if l2 else "size not reported") + ")")
            lines.append(f"- L2 cache, {kind}: `{mode}` — {text}")
    return lines


def _op_table(groups: Sequence[Sequence[Row]], sp: dict[str, dict[str, float]]) -> list[str]:
    """Compact table of one op: a line per shape/dtype/pass, the variants' times side by side, the
    fastbisenet speedups and the fastbisenet row's achieved rates."""
    variants = sorted({r.variant for rs in groups for r in rs}, key=_variant_rank)
    peers = [v for v in variants if v != "fastbisenet"]
    lines = ["| case | dtype | pass | calls | " + " | ".join(f"{v} (ms)" for v in variants) + " | "
             + " | ".join(f"vs {p}" for p in peers) + " | GB/s | TFLOP/s | % of floor | timing |",
             "|---|---|---|---:|" + "---:|" * (len(variants) + len(peers) + 3) + "---|"]
    for rs in groups:
        by_v = {r.variant: r for r in rs}
        i = rs[0].info
        fast = by_v.get("fastbisenet")
        m = row_metrics(fast) if fast else {}
        g = rs[0].group
        times = [f"{by_v[v].time_s * 1e3:.4f}" if v in by_v else "—" for v in variants]
        speed = [f"{sp[g][p]:.2f}x" if p in sp.get(g, {}) else "—" for p in peers]
        lines.append(f"| {i.get('case', g)} | {i.get('dtype', '')} | {i.get('pass', '')} | {i.get('calls', '')} | "
                     + " | ".join(times) + " | " + " | ".join(speed) + " | "
                     f"{_fmt(m.get('gbps'), '.1f')} | {_fmt(m.get('tflops'), '.2f')} | "
                     f"{_fmt(m.get('pct_floor'), '.1f', '%')} | {_timing(fast) if fast else ''} |")
    return [*lines, "", "GB/s, TFLOP/s and % of floor are those of fastbisenet.", ""]


def autotune_lines(choices: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown tables of :func:`.workloads.autotune_choices`: per kernel, each key's winning config
    (``choices`` may be ``{"error": ...}`` when they could not be read)."""
    if not choices:
        return []
    if isinstance(choices, dict):
        choices = [choices]
    lines = ["## Autotune choices", "",
             "The config Triton's autotuner picked for each key the run launched (ONE_LOOP: the conv's K loop as "
             "one loop over (tap, channel block) steps; else nested per tap). Each benchmark stage is its own "
             "process and tunes afresh: a key can have one choice per stage.", ""]
    for c in choices:
        if "error" in c:
            lines += [f"Not recorded{' (stage ' + c['stage'] + ')' if c.get('stage') else ''}: {c['error']}", ""]
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for c in choices:
        if "kernel" in c:
            by_kernel.setdefault(c["kernel"], []).append(c)
    staged = any(c.get("stage") for cs in by_kernel.values() for c in cs)
    for kernel, cs in sorted(by_kernel.items()):
        lines += [f"### {kernel}", "", "| key | dtypes | config |" + (" stage |" if staged else ""),
                  "|---|---|---|" + ("---|" if staged else "")]
        for c in cs:
            key = ", ".join(f"{k}={v}" for k, v in c["key"].items())
            dts = ", ".join(d.removeprefix("torch.") for d in c["dtypes"])
            cfg = " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_')}={v}" for k, v in c["config"].items())
            lines.append(f"| {key} | {dts} | {cfg} |" + (f" {c.get('stage', '')} |" if staged else ""))
        lines.append("")
    return lines


def _plotted(r: Row) -> bool:
    """Rows :func:`plot_end_to_end` draws: end-to-end inference."""
    return r.info.get("op") == "end_to_end" and r.info.get("pass") != "train"


def plot_end_to_end(rows: Sequence[Row], path: str | Path) -> bool:
    """PNG of end-to-end inference latency by input size, one line per variant and dtype.

    Returns False (and writes nothing) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in rows if _plotted(r)]
    if not e2e:
        return False
    shapes = sorted({tuple(r.info["shape"]) for r in e2e}, key=lambda s: (math.prod(s), s))
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in e2e:
        series.setdefault((r.variant, r.info.get("dtype", "")), {})[shapes.index(tuple(r.info["shape"]))] = \
            r.time_s * 1e3
    for (variant, dt), pts in sorted(series.items(), key=lambda kv: (_variant_rank(kv[0][0]), kv[0][1])):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", linestyle="-" if dt == "bfloat16" else "--",
                label=f"{variant} ({dt})")
    ax.set_xticks(range(len(shapes)), [shape_str(s) for s in shapes])
    ax.set_xlabel("input (N x C x H x W)")
    ax.set_ylabel("latency (ms, median)")
    ax.set_yscale("log")
    device = e2e[0].info.get("device_name", "")
    ax.set_title(f"BiSeNet end-to-end inference latency — {device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(json_path: str | Path | Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and (with matplotlib) ``end_to_end.png`` into ``out_dir`` from one pytest-benchmark
    JSON or several (:func:`load_rows`). A ``summary.txt`` in ``out_dir`` (bench/gpu_suite.sh's step log:
    the test suite's status among them) is quoted at the top, so no table is read without it.

    Returns ``markdown`` and ``plot`` (paths; ``plot`` None when not written), ``plot_skipped`` (why
    not, else None), ``rows`` (number of benchmark rows) and ``plot_rows`` (how many of them the plot draws)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = load_rows(json_path)
    md = out / "report.md"
    text = render_markdown(rows, meta)
    summary = out / "summary.txt"
    if summary.is_file() and summary.read_text().strip():
        head, _, rest = text.partition("\n\n")
        steps = [line.removeprefix("=== ") for line in summary.read_text().splitlines() if line.strip()]
        text = "\n".join([head, "", "## Suite steps (bench/gpu_suite.sh summary.txt)", "", "```", *steps, "```",
                           "", rest])
    md.write_text(text)
    png: Path | None = out / "end_to_end.png"
    reason = None
    try:
        if not plot_end_to_end(rows, png):
            reason = "no end-to-end inference rows: plot skipped"
    except ImportError:
        reason = "matplotlib is not installed: plot skipped (pip install matplotlib)"
    if reason:
        print(reason, file=sys.stderr)
        png = None
    return {"markdown": md, "plot": png, "plot_skipped": reason, "rows": len(rows),
            "plot_rows": sum(map(_plotted, rows))}
