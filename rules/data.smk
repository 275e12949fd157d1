# The data side of the chain: the dataset, the VQ-VAE, its latents, and the judge.


rule prepare_data:
    output:
        f"{RUN}/data/dataset.h5",
    log:
        f"{RUN}/logs/prepare_data.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=0,
    params:
        run=run_dir,
        cfg=stage_config("prepare_data"),
    shell:
        stage_shell("prepare_data", dispatch=False)


rule train_vqvae:
    input:
        f"{RUN}/data/dataset.h5",
    output:
        model=f"{RUN}/vqvae/model.pt",
        metrics=f"{RUN}/vqvae/metrics.json",
        recon=report(
            f"{RUN}/vqvae/reconstructions.png", caption="../pipeline/report/reconstructions.rst", category="VQ-VAE"
        ),
        log_csv=f"{RUN}/vqvae/train_log.csv",
    log:
        f"{RUN}/logs/train_vqvae.log",
    conda:
        CONDA_ENV
    threads: CORES
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=stage_config("train_vqvae"),
    shell:
        stage_shell("train_vqvae")


rule extract_latents:
    input:
        f"{RUN}/data/dataset.h5",
        f"{RUN}/vqvae/model.pt",
    output:
        f"{RUN}/latents/latents.h5",
    log:
        f"{RUN}/logs/extract_latents.log",
    conda:
        CONDA_ENV
    threads: CORES
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=stage_config("extract_latents"),
    shell:
        stage_shell("extract_latents")


rule train_classifier:
    input:
        f"{RUN}/data/dataset.h5",
    output:
        model=f"{RUN}/classifier/model.pt",
        metrics=f"{RUN}/classifier/metrics.json",
        log_csv=f"{RUN}/classifier/train_log.csv",
    log:
        f"{RUN}/logs/train_classifier.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=stage_config("train_classifier"),
    shell:
        stage_shell("train_classifier")


rule train_simclr:
    input:
        f"{RUN}/data/dataset.h5",
    output:
        model=f"{RUN}/simclr/model.pt",
        metrics=f"{RUN}/simclr/metrics.json",
        log_csv=f"{RUN}/simclr/train_log.csv",
    log:
        f"{RUN}/logs/train_simclr.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=stage_config("train_simclr"),
    shell:
        stage_shell("train_simclr")
