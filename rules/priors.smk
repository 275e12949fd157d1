# The priors over the VQ-VAE's latents: the PixelCNN, latent diffusion, their variants, and
# the pixel-space baseline.


rule train_pixelcnn:
    input:
        f"{RUN}/latents/latents.h5",
    output:
        model=f"{RUN}/pixelcnn/model.pt",
        metrics=f"{RUN}/pixelcnn/metrics.json",
        log_csv=f"{RUN}/pixelcnn/train_log.csv",
    log:
        f"{RUN}/logs/train_pixelcnn.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=variant_stage_config("pixelcnn"),
    shell:
        stage_shell("train_pixelcnn")


rule train_diffusion:
    input:
        f"{RUN}/latents/latents.h5",
    output:
        model=f"{RUN}/diffusion/model.pt",
        metrics=f"{RUN}/diffusion/metrics.json",
        log_csv=f"{RUN}/diffusion/train_log.csv",
    log:
        f"{RUN}/logs/train_diffusion.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=variant_stage_config("diffusion"),
    shell:
        stage_shell("train_diffusion")


rule train_pixel_diffusion:
    input:
        f"{RUN}/data/dataset.h5",
        # steps: null trains as long as the latent model did (equal wall time), so it waits for it
        [f"{RUN}/diffusion/metrics.json"] if config["pixel_diffusion"]["steps"] is None else [],
    output:
        model=f"{RUN}/pixel_diffusion/model.pt",
        metrics=f"{RUN}/pixel_diffusion/metrics.json",
        log_csv=f"{RUN}/pixel_diffusion/train_log.csv",
    log:
        f"{RUN}/logs/train_pixel_diffusion.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=stage_config("train_pixel_diffusion"),
    shell:
        stage_shell("train_pixel_diffusion")


rule train_prior_variant:
    # a prior's class-conditional variant (<prior>_cond/, for _g<s> sets) and the quality-vs-compute
    # study's models trained at f times their steps (<prior>[_cond]_b<f>/, for _b<f> sets)
    input:
        f"{RUN}/latents/latents.h5",
    output:
        model=f"{RUN}/{{prior}}_{{variant}}/model.pt",
        metrics=f"{RUN}/{{prior}}_{{variant}}/metrics.json",
        log_csv=f"{RUN}/{{prior}}_{{variant}}/train_log.csv",
    log:
        f"{RUN}/logs/train_{{prior}}_{{variant}}.log",
    wildcard_constraints:
        prior="pixelcnn|diffusion",
        variant=r"cond|(?:cond_)?b\d+(?:\.\d+)?",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=variant_params,
        flags=variant_flags,
    shell:
        stage_shell("train_{wildcards.prior}", "{params.flags}")
