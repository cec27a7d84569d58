"""`nas` command line: a table of subcommands, each in nas/commands/<name>.py.

Every command module defines `SETTINGS` (a pydantic model, nas/core/settings.py, or a table of them for
sub-actions) and `run(settings) -> int | None`. argparse gets the flags from the model; the parsed
line becomes a validated model; `--dry-run` prints it. The CLI turns a NasError into one line on
stderr and exit code 2; it holds no logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from nas.core.errors import EXIT_USER_ERROR, NasError
from nas.core.settings import add_actions, add_arguments, execute, from_namespace

# name -> (module, one-line help). One explicit table; unknown names are argparse errors.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("nas.commands.inspect", "parameters, MACs (attention included), latency of an arch or space"),
    "latency-table": (
        "nas.commands.latency_table",
        "time a space's blocks on a device into a latency lookup table",
    ),
    "search": ("nas.commands.search", "search a space with Optuna or Ray Tune (proxy training + latency)"),
    "export": ("nas.commands.export", "export an architecture from a study (YAML, diffusers config, card)"),
    "report": ("nas.commands.report", "plots and a summary table of a study"),
    "run": ("nas.pipeline.command", "run an experiment end to end (stages cached and resumable)"),
    "train": ("nas.commands.train", "train a U-Net on a latent cache (recipe presets, EMA, resume)"),
    "data": (
        "nas.commands.data",
        "write the embedded shapes dataset; train an evaluator (shapes, or any cache)",
    ),
    "vae": ("nas.commands.vae", "train a small AutoencoderKL for low-resolution data"),
    "precompute": ("nas.commands.precompute", "encode a dataset once into a resumable latent cache"),
    "sample": ("nas.commands.sample", "draw images from a trained run (PNG, JSON sidecars, grid)"),
    "inherit": ("nas.commands.inherit", "start a student U-Net from a trained teacher (weight inheritance)"),
    "export-pipeline": (
        "nas.commands.export_pipeline",
        "write a run as a diffusers StableDiffusionPipeline folder",
    ),
    "export-onnx": (
        "nas.commands.export_onnx",
        "write a U-Net as ONNX; check it against eager PyTorch with ONNX Runtime",
    ),
    "eval": ("nas.commands.eval", "image quality against denoising steps (alignment, Frechet distance)"),
    "compare": ("nas.commands.compare", "blind side-by-side survey page of two runs; tally its votes"),
}


HELP_WIDTH = 100  # columns of the generated docs/cli/*.txt (argparse otherwise follows the terminal)


def build_parser(width: int | None = None) -> argparse.ArgumentParser:
    """The whole command line; `width` fixes the help's line width (None: the terminal's)."""

    def formatter(raw: bool = False):
        cls = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
        return cls if width is None else lambda prog: cls(prog, width=width)

    parser = argparse.ArgumentParser(
        prog="nas", description="Architecture search for diffusion U-Nets.", formatter_class=formatter()
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=formatter(),
        )
        if isinstance(module.SETTINGS, dict):
            p.formatter_class = formatter(raw=True)  # keep the usage table of the doc
            add_actions(p, module.SETTINGS)
        else:
            add_arguments(p, module.SETTINGS)
            p.set_defaults(_model=module.SETTINGS)
    return parser


def help_pages() -> dict[str, str]:
    """docs/cli/<command>.txt: each command's full --help (and its actions'), from the settings models."""
    parser = build_parser(width=HELP_WIDTH)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    pages = {"nas": parser.format_help()}
    for name, p in commands.choices.items():
        parts = [p.format_help()]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):  # `nas data shapes`, ...
                for sub_name, sub in action.choices.items():
                    sub.formatter_class = p.formatter_class
                    parts.append(f"\n---- nas {name} {sub_name} --help\n\n{sub.format_help()}")
        pages[name] = "".join(parts)
    return pages


def write_help_pages(folder: str | Path) -> list[Path]:
    """Write `help_pages()` into `folder` (`make docs`); return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in help_pages().items():
        path = folder / f"{name}.txt"
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from nas.core.noise import quiet_harmless

    quiet_harmless()  # library warnings about nothing (each named, with its reason, in nas/core/noise.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = execute(from_namespace(args._model, args))
    except NasError as exc:
        print(f"nas {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # a command may name what to rerun (`hint`), and SIGTERM's code
        print(f"nas {args.command}: {getattr(exc, 'hint', None) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    return code


if __name__ == "__main__":
    sys.exit(main())
