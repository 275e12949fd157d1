# Sampling, the evaluation and the run's timings.
# Paths in a rule file (conda:, caption=) are relative to this folder, rules/; inputs and outputs to the working directory.

STUDY_CAPTIONS = {
    s: f"../pipeline/report/{s}.rst"
    for s in ("scaling", "sampling_layer", "diffusion_steps", "latent_vs_pixel", "guidance")
}


# With SLURM dispatch, the sample sets of a run go to SLURM as one job (slurm.sample_in_one_job):
# one queue wait instead of one per set. Each set is still its own output; one set alone:
# python -m pipeline sample --run results/<run> --sample-set <set> --submit.
if SAMPLE_IN_ONE_JOB:

    rule sample_sets:
        input:
            sorted({path for m in SAMPLE_SETS for path in sampler_inputs_of(m)}),
        output:
            **{f"npy_{i}": f"{RUN}/samples/{m}.npy" for i, m in enumerate(SAMPLE_SETS)},
            **{
                f"png_{i}": report(
                    f"{RUN}/samples/{m}.png",
                    caption="../pipeline/report/samples.rst",
                    category="Samples",
                    labels={"sample set": m},
                )
                for i, m in enumerate(SAMPLE_SETS)
            },
            **{f"record_{i}": f"{RUN}/samples/{m}.json" for i, m in enumerate(SAMPLE_SETS)},
        log:
            f"{RUN}/logs/sample_sets.log",
        conda:
            CONDA_ENV
        threads: 1
        resources:
            gpu=1,
            dispatch=DISPATCH,
        params:
            run=run_dir,
            cfg=stage_config("sample"),
        shell:
            stage_shell("sample", " ".join(f"--sample-set {m}" for m in SAMPLE_SETS))


rule sample:
    input:
        sampler_inputs,
    output:
        npy=f"{RUN}/samples/{{sample_set}}.npy",
        png=report(
            f"{RUN}/samples/{{sample_set}}.png",
            caption="../pipeline/report/samples.rst",
            category="Samples",
            labels={"sample set": "{sample_set}"},
        ),
        record=f"{RUN}/samples/{{sample_set}}.json",
    log:
        f"{RUN}/logs/sample_{{sample_set}}.log",
    wildcard_constraints:
        sample_set=SAMPLE_SET_PATTERN,
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=sample_params,
    shell:
        stage_shell("sample", "--sample-set {wildcards.sample_set}")


rule evaluate:
    input:
        f"{RUN}/data/dataset.h5",
        JUDGE_MODELS,
        expand(f"{RUN}/samples/{{sample_set}}.{{ext}}", sample_set=SAMPLE_SETS, ext=("npy", "json")),
        # carried into the table: every trained model's own metrics and training log
        expand(f"{RUN}/{{stage}}/{{f}}", stage=["vqvae"] + MODEL_FOLDERS, f=("metrics.json", "train_log.csv")),
    output:
        metrics=report(f"{RUN}/report/metrics.json", caption="../pipeline/report/metrics.rst", category="Metrics"),
        summary=f"{RUN}/report/summary.md",
        sets=report(
            f"{RUN}/report/sets.tsv",
            caption="../pipeline/report/sets.rst",
            category="Metrics",
            labels={"table": "all sample sets"},
        ),
        curves=report(f"{RUN}/report/training_curves.png", caption="../pipeline/report/curves.rst", category="Training"),
        studies=[
            report(f"{RUN}/report/{s}.tsv", caption=STUDY_CAPTIONS[s], category="Studies", labels={"study": s})
            for s in STUDIES
        ],
        scaling_plot=(
            [
                report(
                    f"{RUN}/report/scaling.png",
                    caption="../pipeline/report/scaling_plot.rst",
                    category="Studies",
                    labels={"study": "scaling plot"},
                )
            ]
            if "scaling" in STUDIES
            else []
        ),
    log:
        f"{RUN}/logs/evaluate.log",
    conda:
        CONDA_ENV
    threads: CORES
    resources:
        gpu=1,
        dispatch=DISPATCH,
    params:
        run=run_dir,
        cfg=stage_config("evaluate"),
    shell:
        stage_shell("evaluate")


rule timings:
    input:
        f"{RUN}/data/dataset.h5",
        f"{RUN}/vqvae/metrics.json",
        f"{RUN}/latents/latents.h5",
        expand(f"{RUN}/samples/{{sample_set}}.json", sample_set=SAMPLE_SETS),
        f"{RUN}/report/metrics.json",
    output:
        f"{RUN}/timings.json",
    log:
        f"{RUN}/logs/timings.log",
    localrule: True
    conda:
        CONDA_ENV
    params:
        run=timings_run_dir,
    shell:
        "python -m pipeline timings --run {params.run:q} > {log:q} 2>&1"
