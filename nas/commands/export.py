"""Export an architecture from a study: arch.yaml, the U-Net config.json diffusers loads with
`from_config`, and a card (params, MACs, latency, proxy score, trial, study, space, date).

--pick best (lowest proxy loss), knee (the balanced Pareto point), or an expression such as
"latency_ms<=12" or "latency_ms<=12, params<5e6": the lowest proxy loss under the constraints."""

from __future__ import annotations

from pydantic import field_validator

from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("export",)
    study: str = arg(help="study name", min_length=1)
    storage: str | None = arg(None, "RDB URL (default sqlite:///RESULTS/<study>/study.db)")
    results: str = arg("results", "parent folder of the study folder")
    pick: str = arg("best", 'best | knee | EXPR, e.g. "latency_ms<=12"')
    out: str = arg(help="folder to write")

    @field_validator("pick")
    @classmethod
    def _pick(cls, value: str) -> str:
        if value not in ("best", "knee"):
            from nas.core.errors import NasError
            from nas.search.export import parse_conditions

            try:
                parse_conditions(value)
            except NasError as exc:  # the message starts with "--pick 'EXPR': "
                raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return value


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.search.export import export_trial, pick_trial
    from nas.search.study import load_study

    study = load_study(settings.study, settings.storage, settings.results)
    trial = pick_trial(study, settings.pick)
    card = export_trial(study, trial, settings.out, settings.pick)
    print(
        f"exported trial {card['trial']} of {settings.study} to {settings.out}: {card['params']:,} params, "
        f"{card['macs'] / 1e9:.3f} GMACs, {card['latency_ms_p50']:.2f} ms, proxy loss {card['proxy_loss']:.5f}"
    )
    return 0
