"""Ranges of every numeric field of the YAML formats (space, architecture, training, experiment)
and of the sampling settings: one table, so the schemas, the error messages and the README agree.

Each bound admits every shipped file and real models with generous headroom (the figure in the
comment); beyond it a value is a typo that would only make `nas` build or loop over a huge model,
so it is refused up front with a one-line error instead of hanging.
"""

from __future__ import annotations

# --- U-Net shape (architecture and space files) ------------------------------------------------
MAX_LEVELS = 8  # resolution levels (SD 1.5 / SDXL: 4 / 3); 2**7 = 128x downsampling of the latent
MAX_CHANNELS = 8192  # channels of a level (SD 1.5: 1280, SDXL: 1280, DeepFloyd IF-I-XL: 4x 1280)
MAX_RESNETS = 10  # ResNet layers per down block (SD: 2; Imagen's Efficient U-Net: up to 8)
# transformer layers per block (a block's total over its ResNets; SDXL's lowest level: 2 ResNets
# x 10 = 20 on the down path, 3 x 10 = 30 on the up path)
MAX_ATTENTIONS = 64
MAX_MID_RESNETS = MAX_RESNETS  # mid block ResNets, all of them (SD: 2; DeciDiffusion 1.0: 5)
MAX_HEADS = 128  # attention heads (SD 1.5: 8; SDXL: 20 at 1280 channels = 64 per head)
MAX_LATENT_CHANNELS = 256  # VAE latent channels (SD: 4; SD3 / FLUX: 16; DC-AE f64: 128)
MAX_LATENT_SIZE = 256  # latent side, pixels / VAE factor (SD 1.5: 64; SDXL: 128 = 1024 px / 8)
MAX_CROSS_ATTENTION_DIM = 8192  # text encoder width (CLIP ViT-L: 768; SDXL: 2048; T5-XXL: 4096)
MAX_TEXT_LEN = 1024  # tokens per caption (CLIP: 77; PixArt-alpha T5: 120; SD3 T5: 256)
MAX_NORM_GROUPS = 1024  # GroupNorm groups (SD: 32); must divide every channel count anyway
MAX_CHOICES = 64  # choices in one list of a space (channels, heads, head_dim); shipped: <= 2

# --- training (train config, proxy training of the search) --------------------------------------
MAX_STEPS = 10_000_000  # optimizer steps (SD 1.5: ~1.1M over all its stages)
MAX_BATCH = 65_536  # samples per process per micro-step (SD 1.5's global batch: 2048)
MAX_GRAD_ACCUM = 4096  # micro-steps per optimizer step
MAX_LR = 1.0  # AdamW peak learning rate (diffusion U-Nets: 1e-5 .. 1e-3)
MAX_WEIGHT_DECAY = 10.0  # decoupled weight decay (diffusers text-to-image: 1e-2)
MAX_WORKERS = 256  # data-loading processes
MAX_VAL_ITEMS = 1_000_000  # held-out cache items
MAX_VAL_TIMESTEPS = 1000  # (timestep, noise) draws per held-out item
MAX_KEEP_CHECKPOINTS = 1000  # checkpoints kept on disk
MAX_TRAIN_TIMESTEPS = 10_000  # discrete diffusion steps (DDPM / SD: 1000; iDDPM: 4000)
MAX_GRAD_CLIP = 1e6  # max gradient norm (SD / diffusers: 1.0)
MAX_MIN_SNR_GAMMA = 1e4  # Min-SNR gamma (Hang et al. 2023: 5)
MAX_LOSS_WEIGHT = 1e4  # weight of a distillation loss term (BK-SDM: 1.0 each)
MAX_SEED = 2**32 - 1  # numpy's legacy RandomState and many tools take 32-bit seeds

# --- search ------------------------------------------------------------------------------------
MAX_TRIALS = 1_000_000  # trials of a study
MAX_LATENCY_BATCH = 1024  # latents per timed forward
MAX_LATENCY_WARMUP = 1000  # untimed forwards
MAX_LATENCY_ITERS = 10_000  # timed forwards

# --- sampling and evaluation -------------------------------------------------------------------
MAX_SAMPLE_STEPS = 1000  # denoising steps: at most one per training timestep (SD: 1000)
MAX_GUIDANCE = 100.0  # classifier-free guidance scale (SD 1.5: 7.5; beyond ~30 images saturate)
MAX_SAMPLE_BATCH = 1024  # images per pipeline call
MAX_IMAGES = 100_000  # images per prompt / per evaluated step count
MAX_DATA_ITEMS = 10_000_000  # images of the embedded shapes dataset
MAX_IMAGE_SIZE = 1024  # pixels, square (the shapes dataset: 32)
