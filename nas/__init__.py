"""nas: architecture search for latent-diffusion U-Nets."""

__version__ = "0.1.0"
