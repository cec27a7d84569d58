"""Export a U-Net to ONNX (OUT/unet.onnx) and check it: onnx.checker, then ONNX Runtime against eager
PyTorch on a fixed input (largest absolute difference within 1e-4, else an error). OUT/export.json
records the opset, the input names and shapes, the tolerance, the measured difference and the
versions. Weights over --external-data-threshold bytes (default 1 GiB; an fp32 SD 1.5 U-Net has
3.4 GB, over protobuf's 2 GiB limit) go to OUT/unet.onnx.data beside the graph. RUN is a `nas train` run folder (EMA weights if present) or a diffusers U-Net folder."""

from __future__ import annotations

from nas.core import limits as L
from nas.core.settings import CommandSettings, arg
from nas.deploy.choices import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

# ONNX's external data format, nas/deploy/onnx.py (kept here so the CLI needs no torch import).
EXTERNAL_DATA_THRESHOLD = 2**30  # bytes: 1 GiB, half protobuf's 2 GiB limit on one file
MAX_THRESHOLD = 2**40  # bytes (1 TiB): far above any U-Net's weights


class Settings(CommandSettings):
    command = ("export-onnx",)
    run: str = arg(help="run folder of `nas train`, or a diffusers U-Net folder", positional=True)
    out: str = arg(help="folder to write unet.onnx and export.json into")
    opset: int = arg(DEFAULT_OPSET, "ONNX opset", ge=MIN_OPSET, le=MAX_OPSET)
    batch_dynamic: bool = arg(False, "make the batch axis dynamic (default: fixed at --batch)")
    batch: int = arg(
        2, "batch traced (2: one image with classifier-free guidance)", ge=1, le=L.MAX_LATENCY_BATCH
    )
    external_data_threshold: int = arg(
        EXTERNAL_DATA_THRESHOLD,
        "bytes of weights above which they go to unet.onnx.data beside the graph (0: always)",
        ge=0,
        le=MAX_THRESHOLD,
    )


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.sample.onnx_export import export_folder

    report = export_folder(
        settings.run,
        settings.out,
        settings.opset,
        settings.batch_dynamic,
        settings.batch,
        settings.external_data_threshold,
    )
    check = report["check"]
    data = f" + {report['external_data']}" if report["external_data"] else ""
    print(
        f"exported {report['model_class']} ({report['source_kind']}) to {settings.out}/unet.onnx{data}, opset "
        f"{report['opset']}; ONNX Runtime vs eager max |diff| {check['max_abs_diff']:.2e} "
        f"(tolerance {check['tolerance']:g})"
    )
    return 0
