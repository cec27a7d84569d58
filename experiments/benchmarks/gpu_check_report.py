"""README.md of a GPU check (experiments/benchmarks/gpu_check.py) from its results.json data."""

from __future__ import annotations


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def latency_table(section: dict) -> list[str]:
    rows = section.get("rows", [])
    arms = list(dict.fromkeys(f"{r['runtime']} {r['precision']}" for r in rows))
    archs = section.get("archs", {})
    lines = [
        "| architecture | params | GMACs | " + " | ".join(f"{a} (ms)" for a in arms) + " |",
        "|---|---:|---:|" + "---:|" * len(arms),
    ]
    for name, cost in archs.items():
        cells = []
        for arm in arms:
            found = [r for r in rows if r["arch"] == name and f"{r['runtime']} {r['precision']}" == arm]
            r = found[0] if found else {}
            if "ms_p50" in r:
                cells.append(_fmt(r["ms_p50"]))
            elif "error" in r:
                cells.append("error")
            elif "skipped" in r:
                cells.append("skipped")
            else:
                cells.append("not run")
        lines.append(
            f"| {name} | {cost['params'] / 1e6:.1f}M | {cost['gmacs']} | " + " | ".join(cells) + " |"
        )
    notes = {}
    for r in rows:
        reason = r.get("skipped") or r.get("error")
        if reason:
            notes.setdefault(f"{r['runtime']} {r['precision']}: {reason}", []).append(r["arch"])
    if notes:
        lines += ["", "Not measured:", ""]
        lines += [f"- {reason} ({', '.join(a)})" for reason, a in notes.items()]
    return lines


def readme(data: dict) -> str:
    d = data["device"]
    s = data["sections"]
    lines = [
        f"# GPU check: {d['name']}" + (" (smoke, CPU)" if data["smoke"] else ""),
        "",
        f"Command: `{data['command']}` ({data['date']}, {data.get('total_seconds', '-')} s in all).",
        "",
        f"Device {d['name']}, driver {d.get('driver', '-')}, CUDA {d.get('cuda')}, torch {d['torch']}, "
        f"diffusers {d.get('diffusers')}, onnxruntime {d.get('onnxruntime') or d.get('onnxruntime-gpu')} "
        f"(providers: {', '.join(d.get('onnxruntime_providers', [])) or 'none'}), Python {d['python']}.",
        "",
    ]
    for name, section in s.items():
        lines += [f"## {name}", "", f"Status: {section['status']} ({section.get('seconds', '-')} s).", ""]
        if name == "latency" and section.get("archs"):
            first = next(iter(section["archs"].values()))
            lines += [
                f"Per-call U-Net latency (median of {section['iters']} calls after {section['warmup']} warm-up"
                f" calls), batch {section['batch']} (CFG), {first['latent_size']}x{first['latent_size']}"
                f" latents, {first['tokens']} text tokens, random weights; runtimes as in"
                " nas/deploy/runtimes.py.",
                "",
                *latency_table(section),
                "",
            ]
        if name == "train" and section.get("step_s") is not None:
            lines += [
                f"{section['teacher']} teacher -> {section['student']} student (inherited), BK-SDM losses,"
                f" batch {section['batch']} at {section['latent_size']}x{section['latent_size']} latents,"
                f" {section['mixed_precision']} autocast, gradient checkpointing, {section['steps']} steps"
                " after untimed warm-up steps:",
                "",
                "| s/step | teacher share | peak CUDA memory (GiB) | build + inherit (s) |",
                "|---:|---:|---:|---:|",
                f"| {_fmt(section['step_s'], 3)} | {_fmt(section.get('teacher_share'))} |"
                f" {_fmt(section.get('peak_cuda_memory_gib'))} | {_fmt(section.get('build_inherit_s'), 1)} |",
                "",
            ]
        if name == "table" and section.get("blocks"):
            v = section.get("validation") or {}
            lines += [
                f"`{section['space']}`: {section['blocks']} blocks, built in {section['build_seconds']} s"
                f" ({section['setup']['rounds']} rounds, {section['fit']} fit networks).",
                "",
                "| validation networks | Spearman rho | MAPE | within +-10% |",
                "|---:|---:|---:|---:|",
                f"| {v.get('count', 0)} | {_fmt(v.get('spearman'), 3)} | {_fmt(v.get('mape_pct'), 1)}% |"
                f" {_fmt(100 * v['within_10pct'] if v else None, 0)}% |",
                "",
            ]
    return "\n".join(lines) + "\n"
