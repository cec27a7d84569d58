"""Export an architecture from a study: arch.yaml, the U-Net config.json diffusers loads with
`from_config`, and a card (params, MACs, latency, proxy score, trial, study, space, date).

--pick best (lowest proxy loss), knee (the balanced Pareto point), or an expression such as
"latency_ms<=12" or "latency_ms<=12, params<5e6": the lowest proxy loss under the constraints."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None, help="RDB URL (default sqlite:///RESULTS/<study>/study.db)")
    p.add_argument("--results", default="results")
    p.add_argument("--pick", default="best", help='best | knee | EXPR, e.g. "latency_ms<=12"')
    p.add_argument("--out", required=True, help="folder to write")


def run(args) -> int:
    from nas.search.export import export_trial, pick_trial
    from nas.search.study import load_study

    study = load_study(args.study, args.storage, args.results)
    trial = pick_trial(study, args.pick)
    card = export_trial(study, trial, args.out, args.pick)
    print(
        f"exported trial {card['trial']} of {args.study} to {args.out}: {card['params']:,} params, "
        f"{card['macs'] / 1e9:.3f} GMACs, {card['latency_ms_p50']:.2f} ms, proxy loss {card['proxy_loss']:.5f}"
    )
    return 0
