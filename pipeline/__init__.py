"""vq-latent-pipeline: VQ-VAE -> latents.h5 -> PixelCNN prior and latent diffusion -> sample grids.

Stages are top-level callables ``fn(cfg, run_dir, threads=None, **kw) -> metrics`` listed in
:mod:`pipeline.stages`; the Snakefile runs them through ``python -m pipeline <stage>``. A finished
run from Python: ``from pipeline.api import Run; Run.open("results/default")``
(:class:`pipeline.api.Run`).
"""

__version__ = "0.1.0"
