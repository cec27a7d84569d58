"""ONNX export of a U-Net (`nas export-onnx`, and the ONNX runtimes of nas/deploy/runtimes.py).

Graph inputs (all float32):
  sample                 [B, C, H, W]  latents (C = in_channels, H = W = sample_size)
  timestep               [B]           diffusion timestep per latent (a scalar is broadcast by the caller)
  encoder_hidden_states  [B, L, D]     text embeddings (D = cross_attention_dim; L dynamic)
  timestep_cond          [B, G]        the guidance embedding (nas/models/guidance.py; G =
                                       time_cond_proj_dim), only for a U-Net whose config sets it
Output: out_sample [B, C, H, W], the U-Net's prediction (noise, v or x0, as trained).
B is dynamic with --batch-dynamic (the runtimes always export it so), else fixed at the traced batch.

Exporter: torch.onnx.export with the TorchScript tracer (dynamo=False): a tiny U-Net exports in
about 3 s against about 35 s for the dynamo exporter on 2 CPU cores, with the same outputs. Opset 17
(default) is the first with LayerNormalization as one op, which keeps the transformer blocks whole.
The export is checked with onnx.checker and by running ONNX Runtime against eager PyTorch on a fixed
input: the largest absolute difference must be within FP32_TOLERANCE, else NasError.

External data: a protobuf file cannot exceed 2 GiB, and an fp32 SD 1.5 U-Net holds 3.4 GB of
weights. A U-Net whose weights exceed `external_data_threshold` bytes is written as the graph
(`unet.onnx`) plus one weights file beside it (`unet.onnx.data`), as
`onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True)` writes them; ONNX
Runtime and onnx.checker read the pair from the graph's path. (torch's exporter alone would write one
file per tensor above 2 GiB.)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from nas.core.errors import NasError
from nas.deploy.choices import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
GUIDANCE_INPUT = "timestep_cond"  # the fourth input, exactly when the config has time_cond_proj_dim
OUTPUT_NAMES = ("out_sample",)
# Largest |ORT - eager| allowed on U-Net outputs of unit scale: fp32 reassociation in fused kernels
# measured 1e-6 on the tiny test U-Nets; 1e-4 leaves room for deep SD-size graphs.
FP32_TOLERANCE = 1e-4
DEFAULT_TOKENS = 77  # CLIP's text length, when the source says none
# Bytes of weights above which the export keeps them in a separate file: 1 GiB, half the 2 GiB
# protobuf limit on one file (the graph's own nodes and attributes come on top of the weights).
EXTERNAL_DATA_THRESHOLD = 2**30


def timesteps_1d(timestep, batch: int) -> torch.Tensor:
    """Scalar, 0-d or [B] timestep (int or float, as schedulers give it) -> float32 [B] on CPU."""
    t = torch.as_tensor(timestep).detach().to("cpu", torch.float32)
    return t.reshape(1).expand(batch).contiguous() if t.ndim == 0 else t


def guidance_dim(config) -> int | None:
    """The U-Net's guidance-embedding width (time_cond_proj_dim), None without one."""
    return getattr(config, "time_cond_proj_dim", None)


def input_names(config) -> tuple[str, ...]:
    """The graph's inputs for a U-Net config: INPUT_NAMES, plus GUIDANCE_INPUT with a guidance embedding."""
    return (*INPUT_NAMES, GUIDANCE_INPUT) if guidance_dim(config) is not None else INPUT_NAMES


def onnx_feed(
    sample, timestep, encoder_hidden_states, names=None, timestep_cond=None
) -> dict[str, np.ndarray]:
    """The exported graph's inputs (INPUT_NAMES, and GUIDANCE_INPUT when `timestep_cond` is given) as
    float32 numpy arrays, only those in `names` when given: the exporter drops an input the graph never
    reads (a U-Net without any attention layer has no `encoder_hidden_states`), and the runtimes refuse
    unknown inputs."""
    x = sample.detach().to("cpu", torch.float32).contiguous()
    text = encoder_hidden_states.detach().to("cpu", torch.float32).contiguous()
    t = timesteps_1d(timestep, x.shape[0])
    feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": text.numpy()}
    if timestep_cond is not None:
        feed[GUIDANCE_INPUT] = timestep_cond.detach().to("cpu", torch.float32).contiguous().numpy()
    return feed if names is None else {k: v for k, v in feed.items() if k in names}


class _Forward(torch.nn.Module):
    """The U-Net's (sample, timestep, text[, timestep_cond]) -> tensor forward, as torch.onnx traces it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        out = self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False
        )
        return out[0]


# Guidance weights w the example inputs embed (spread over LCM's usual guidance scales 2..9, w =
# scale - 1), so a traced or checked cond_proj sees a realistic, per-sample input.
EXAMPLE_W = (1.0, 8.0)


def example_inputs(config, batch: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fixed (sample, timestep, text) for a U-Net config: seeded normals, timesteps spread over 0..999;
    with a guidance embedding also timestep_cond, w spread over EXAMPLE_W embedded."""
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, size, size, generator=gen)
    timestep = torch.linspace(999, 1, batch)
    text = torch.randn(batch, tokens, config.cross_attention_dim, generator=gen)
    dim = guidance_dim(config)
    if dim is None:
        return sample, timestep, text
    from nas.models.guidance import guidance_embedding

    return sample, timestep, text, guidance_embedding(torch.linspace(*EXAMPLE_W, batch), dim)


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers an export stores as initializers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def data_path(path: Path) -> Path:
    """The external weights file of the graph at `path` (unet.onnx -> unet.onnx.data)."""
    return path.with_name(path.name + ".data")


def save_external(source: Path, path: Path) -> None:
    """The ONNX graph at `source` (its weights inline or in torch's per-tensor files) rewritten as
    `path` plus one weights file, data_path(path)."""
    import onnx

    model = onnx.load(str(source))  # reads external tensors, if any, from beside `source`
    data_path(path).unlink(missing_ok=True)  # save_model appends to an existing file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path(path).name,
    )


def export_unet(
    unet,
    path: Path,
    tokens: int = DEFAULT_TOKENS,
    batch: int = 2,
    batch_dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> bool:
    """Write `unet` (fp32, CPU) as an ONNX graph to `path` (see the module doc for inputs); with
    weights over `external_data_threshold` bytes, they go to data_path(path). True when they did."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise NasError(f"--opset {opset}: out of range (allowed: {MIN_OPSET}..{MAX_OPSET})")
    unet = unet.to("cpu", torch.float32).eval()
    names = input_names(unet.config)
    axes: dict[str, dict[int, str]] = {"encoder_hidden_states": {1: "tokens"}}
    if batch_dynamic:
        for name in (*names, *OUTPUT_NAMES):
            axes.setdefault(name, {})[0] = "batch"
    path.parent.mkdir(parents=True, exist_ok=True)
    external = weights_bytes(unet) > external_data_threshold

    def export(to: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on Python control flow over shapes
            torch.onnx.export(
                _Forward(unet),
                example_inputs(unet.config, batch, tokens),
                str(to),
                input_names=list(names),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )

    if not external:
        export(path)
        data_path(path).unlink(missing_ok=True)  # a stale weights file of an earlier, larger export
        return False
    with tempfile.TemporaryDirectory(prefix="nas-onnx-", dir=path.parent) as tmp:
        export(Path(tmp) / path.name)
        save_external(Path(tmp) / path.name, path)
    return True


def compare_with_eager(unet, path: Path, batch: int, tokens: int) -> float:
    """Largest |ONNX Runtime (CPU) - eager| on a fixed input (seed 1, not the traced one)."""
    import onnxruntime as ort

    inputs = example_inputs(unet.config, batch, tokens, seed=1)
    with torch.no_grad():
        reference = _Forward(unet.to("cpu", torch.float32).eval())(*inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    cond = inputs[3] if len(inputs) > 3 else None  # the guidance embedding, where the U-Net has one
    feed = onnx_feed(inputs[0], inputs[1], inputs[2], names, timestep_cond=cond)
    got = torch.from_numpy(session.run(None, feed)[0])
    return float((got - reference).abs().max())
