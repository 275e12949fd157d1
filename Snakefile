# vq-latent-pipeline: prepare_data -> train_vqvae -> extract_latents -> train_pixelcnn + train_diffusion
#                     -> sample (one job per sample set) -> evaluate (judged by train_classifier) -> timings
#                     (+ train_pixel_diffusion, the pixel-space baseline, when a pixeldiff_* set is listed)
#
#   snakemake --report results/default/report.html   # Snakemake's report: grids, curves, tables
#   snakemake --cores 2                           # the whole chain on the embedded default data
#   snakemake --config run=try2 --cores 2         # writes to results/try2/
#   snakemake --forcerun train_diffusion --cores 2
#   snakemake --configfile my.yaml --cores 2      # merged over pipeline/configs/default.yaml
#
# Each rule's params is its config section: changing one section re-runs that stage and what
# depends on it, nothing else. Every stage runs `python -m pipeline <stage>` with that part of the
# validated config as JSON, so the same command works without Snakemake. This file never
# imports torch.
import json
import os
import sys

from snakemake.utils import min_version, validate

sys.path.insert(0, workflow.basedir)
from pipeline.config import coerce_strings, stage_view, variant_config  # pyyaml only: the Snakefile never imports torch
from pipeline.dispatch import shell_args  # submitit and yaml, no torch
from pipeline.sets import SAMPLE_SET_PATTERN, parse_sample_set, studies_for  # no torch

min_version("9.0")

report: "pipeline/report/workflow.rst"


# Packaged defaults first; --configfile and --config are merged over them.
configfile: os.path.join(workflow.basedir, "pipeline", "configs", "default.yaml")



def _profile_site_config():
    """The site config file (`<profile>/pipeline.yaml`) of the profile in use, if it has one."""
    argv, profile = sys.argv, os.environ.get("SNAKEMAKE_PROFILE")
    for i, arg in enumerate(argv):
        if arg == "--profile" and i + 1 < len(argv):
            profile = argv[i + 1]
        elif arg.startswith("--profile="):
            profile = arg.split("=", 1)[1]
    site = os.path.abspath(os.path.join(profile, "pipeline.yaml")) if profile else None
    return site if site and os.path.isfile(site) else None


# A --configfile on the command line replaces the profile's `configfiles`, which would silently
# drop the site settings (SLURM dispatch!) and train on the login node: refuse that.
_site = _profile_site_config()
if _site and _site not in [str(p) for p in workflow.config_settings.configfiles]:
    _shown = os.path.relpath(_site, workflow.basedir)  # as typed from the repository root
    raise WorkflowError(
        f"--configfile replaced the profile's site config {_shown}; "
        f"list it first: --configfile {_shown} <your files>"
    )

# `--config 'diffusion={steps: 21}'` arrives as strings; read them as the schema's types.
config.update(coerce_strings(config))
validate(config, os.path.join(workflow.basedir, "pipeline", "configs", "schema.yaml"))

RUN = f"results/{config['run']}"
MODELS = config["sample"]["models"]
MODEL_FOLDERS = sorted({parse_sample_set(m).model_folder for m in MODELS})  # pixelcnn, diffusion_cond, ...
STUDIES = studies_for(MODELS)
CONDA_ENV = config["conda_env"]  # envs/cpu.yaml here; the Big Red 200 profile sets envs/cuda.yaml
# PixelCNN and diffusion training (and the samplers) may run side by side. With 4+ cores each
# gets half; with fewer, each takes them all and they run one after another, which on 2 cores is
# faster than 1 thread each because the two trainings are unequal in length.
try:
    CORES = workflow.cores
except WorkflowError:  # --report and other modes that run no job set no core count
    CORES = 1
HALF = CORES // 2 if CORES >= 4 else CORES

# SLURM dispatch (the cluster profiles set slurm.enabled): every GPU stage's command gets
# `--submit --cluster-config ... --account ...` and waits for its own submitit job; otherwise
# `--local`. It is a resource, not a param, so switching it does not re-run finished stages.
SLURM = config["slurm"]
if SLURM["enabled"]:
    _account = SLURM["account"] or os.environ.get("SLURM_ACCOUNT")
    _dry = any(a in ("--dry-run", "--dryrun", "--lint") or (a.startswith("-") and not a.startswith("--") and "n" in a[1:]) for a in sys.argv[1:])
    if not _account and _dry:
        _account = "<set slurm.account or SLURM_ACCOUNT>"  # a dry run submits nothing
    if not _account:
        raise WorkflowError(
            "SLURM dispatch needs an account: add --config slurm={account: <name>} "
            "or export SLURM_ACCOUNT=<name> (nothing was submitted)"
        )
    _cluster = SLURM["cluster_config"]
    if not os.path.isabs(_cluster):
        _cluster = os.path.join(workflow.basedir, _cluster)
    DISPATCH = shell_args(True, _cluster, _account)
else:
    DISPATCH = shell_args(False, None, None)


def run_dir(wildcards, output):
    """results/<run>, from a rule's first output (results/<run>/<stage>/<file>)."""
    return os.path.dirname(os.path.dirname(output[0]))


def stage_config(stage):
    """JSON of what ``stage`` reads (``pipeline.config.stage_view``: the top-level run/device/bf16/
    deterministic keys and its own section(s)), exactly what the stage writes as its config.yaml.

    It is the rule's params, so changing this section (or the device) re-runs the stage and
    its dependents, and changing another section does not.
    """
    return json.dumps(stage_view(config, stage), sort_keys=True)


def variant_stage_config(prior, conditional=False, budget=None):
    """stage_config of one model variant of a prior (``pipeline.config.variant_config``): the
    unconditional model does not read label_dropout or conditional_steps, the conditional one
    reads conditional_steps as its steps, a budget scales the steps."""
    cfg = variant_config(config, prior, conditional=conditional, budget=budget)
    return json.dumps(stage_view(cfg, f"train_{prior}"), sort_keys=True)


def parse_variant(variant):
    """``cond``, ``b<f>`` or ``cond_b<f>`` -> (conditional, budget or None)."""
    conditional = variant.startswith("cond")
    rest = variant[len("cond"):].lstrip("_") if conditional else variant
    return conditional, (float(rest[1:]) if rest else None)


def variant_params(wildcards):
    """The variant's view of its section before the budget is applied: the stage applies
    ``--budget`` itself (applying it here too would scale the steps twice); the budget is in
    the output path, so a changed budget is a new model anyway."""
    conditional, _ = parse_variant(wildcards.variant)
    return variant_stage_config(wildcards.prior, conditional)


def variant_flags(wildcards):
    conditional, budget = parse_variant(wildcards.variant)
    return " ".join((["--conditional"] if conditional else []) + ([f"--budget {budget:g}"] if budget is not None else []))


rule all:
    input:
        expand(f"{RUN}/samples/{{model}}.png", model=MODELS),
        expand(f"{RUN}/samples/{{model}}.npy", model=MODELS),
        f"{RUN}/vqvae/reconstructions.png",
        f"{RUN}/report/metrics.json",
        f"{RUN}/report/summary.md",
        f"{RUN}/timings.json",
    default_target: True


rule prepare_data:
    output:
        f"{RUN}/data/dataset.h5",
    params:
        run=run_dir,
        cfg=stage_config("prepare_data"),
    log:
        f"{RUN}/logs/prepare_data.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=0,
    shell:
        "python -m pipeline prepare_data --run {params.run:q} --threads {threads} --config-json {params.cfg:q} 2>&1 | tee {log:q}"


rule train_vqvae:
    input:
        f"{RUN}/data/dataset.h5",
    output:
        model=f"{RUN}/vqvae/model.pt",
        metrics=f"{RUN}/vqvae/metrics.json",
        recon=report(f"{RUN}/vqvae/reconstructions.png", caption="pipeline/report/reconstructions.rst", category="VQ-VAE"),
        log_csv=f"{RUN}/vqvae/train_log.csv",
    params:
        run=run_dir,
        cfg=stage_config("train_vqvae"),
    log:
        f"{RUN}/logs/train_vqvae.log",
    conda:
        CONDA_ENV
    threads: CORES
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline train_vqvae --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule extract_latents:
    input:
        f"{RUN}/data/dataset.h5",
        f"{RUN}/vqvae/model.pt",
    output:
        f"{RUN}/latents/latents.h5",
    params:
        run=run_dir,
        cfg=stage_config("extract_latents"),
    log:
        f"{RUN}/logs/extract_latents.log",
    conda:
        CONDA_ENV
    threads: CORES
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline extract_latents --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule train_pixelcnn:
    input:
        f"{RUN}/latents/latents.h5",
    output:
        model=f"{RUN}/pixelcnn/model.pt",
        metrics=f"{RUN}/pixelcnn/metrics.json",
        log_csv=f"{RUN}/pixelcnn/train_log.csv",
    params:
        run=run_dir,
        cfg=variant_stage_config("pixelcnn"),
    log:
        f"{RUN}/logs/train_pixelcnn.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline train_pixelcnn --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule train_diffusion:
    input:
        f"{RUN}/latents/latents.h5",
    output:
        model=f"{RUN}/diffusion/model.pt",
        metrics=f"{RUN}/diffusion/metrics.json",
        log_csv=f"{RUN}/diffusion/train_log.csv",
    params:
        run=run_dir,
        cfg=variant_stage_config("diffusion"),
    log:
        f"{RUN}/logs/train_diffusion.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline train_diffusion --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule train_classifier:
    input:
        f"{RUN}/data/dataset.h5",
    output:
        model=f"{RUN}/classifier/model.pt",
        metrics=f"{RUN}/classifier/metrics.json",
        log_csv=f"{RUN}/classifier/train_log.csv",
    params:
        run=run_dir,
        cfg=stage_config("train_classifier"),
    log:
        f"{RUN}/logs/train_classifier.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline train_classifier --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule train_pixel_diffusion:
    input:
        f"{RUN}/data/dataset.h5",
        # steps: null trains as long as the latent model did (equal wall time), so it waits for it
        [f"{RUN}/diffusion/metrics.json"] if config["pixel_diffusion"]["steps"] is None else [],
    output:
        model=f"{RUN}/pixel_diffusion/model.pt",
        metrics=f"{RUN}/pixel_diffusion/metrics.json",
        log_csv=f"{RUN}/pixel_diffusion/train_log.csv",
    params:
        run=run_dir,
        cfg=stage_config("train_pixel_diffusion"),
    log:
        f"{RUN}/logs/train_pixel_diffusion.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline train_pixel_diffusion --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule train_prior_variant:
    # a prior's class-conditional variant (<prior>_cond/, for _g<s> sets) and the quality-vs-compute
    # study's models trained at f times their steps (<prior>[_cond]_b<f>/, for _b<f> sets)
    input:
        f"{RUN}/latents/latents.h5",
    output:
        model=f"{RUN}/{{prior}}_{{variant}}/model.pt",
        metrics=f"{RUN}/{{prior}}_{{variant}}/metrics.json",
        log_csv=f"{RUN}/{{prior}}_{{variant}}/train_log.csv",
    wildcard_constraints:
        prior="pixelcnn|diffusion",
        variant=r"cond|(?:cond_)?b\d+(?:\.\d+)?",
    params:
        run=run_dir,
        cfg=variant_params,
        flags=variant_flags,
    log:
        f"{RUN}/logs/train_{{prior}}_{{variant}}.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline train_{wildcards.prior} {params.flags} --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


def sample_config(name):
    """stage_config("sample") narrowed to the keys sample set ``name`` reads, so that changing,
    say, sample.ddim_steps re-runs the DDIM sets without an _s<S> and nothing else."""
    spec = parse_sample_set(name)
    keys = ["seed", "num_samples", "batch_size"]
    if spec.prior == "pixelcnn":
        keys += ["temperature"] if spec.method == "categorical" and spec.temperature is None else []
    else:
        keys.append("clip_denoised")
        if spec.method == "ddim":
            keys += ["ddim_eta"] + (["ddim_steps"] if spec.steps is None else [])
        elif spec.method == "ddpm":
            keys.append("ddpm_num_samples")
        elif spec.steps is None:  # a diffusers scheduler
            keys.append("solver_steps")
    view = stage_view(config, "sample")
    view["sample"] = {k: view["sample"][k] for k in keys}
    return json.dumps(view, sort_keys=True)


def sampler_inputs(wildcards):
    """The trained model a sample set needs, plus the VQ-VAE that decodes latent codes."""
    spec = parse_sample_set(wildcards.model)
    vqvae = [] if spec.prior == "pixeldiff" else [f"{RUN}/vqvae/model.pt"]
    return vqvae + [f"{RUN}/{spec.model_folder}/model.pt"]


rule sample:
    input:
        sampler_inputs,
    output:
        npy=f"{RUN}/samples/{{model}}.npy",
        png=report(f"{RUN}/samples/{{model}}.png", caption="pipeline/report/samples.rst", category="Samples", labels={"sample set": "{model}"}),
        record=f"{RUN}/samples/{{model}}.json",
    wildcard_constraints:
        model=SAMPLE_SET_PATTERN,
    params:
        run=run_dir,
        cfg=lambda wildcards: sample_config(wildcards.model),
    log:
        f"{RUN}/logs/sample_{{model}}.log",
    conda:
        CONDA_ENV
    threads: HALF
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline sample --model {wildcards.model} --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


STUDY_CAPTIONS = {s: f"pipeline/report/{s}.rst" for s in ("scaling", "sampling_layer", "diffusion_steps", "latent_vs_pixel", "guidance")}


rule evaluate:
    input:
        f"{RUN}/data/dataset.h5",
        f"{RUN}/classifier/model.pt",
        expand(f"{RUN}/samples/{{model}}.{{ext}}", model=MODELS, ext=("npy", "json")),
        # carried into the table: every trained model's own metrics and training log
        expand(f"{RUN}/{{stage}}/{{f}}", stage=["vqvae"] + MODEL_FOLDERS, f=("metrics.json", "train_log.csv")),
    output:
        metrics=report(f"{RUN}/report/metrics.json", caption="pipeline/report/metrics.rst", category="Metrics"),
        summary=f"{RUN}/report/summary.md",
        sets=report(f"{RUN}/report/sets.tsv", caption="pipeline/report/sets.rst", category="Metrics", labels={"table": "all sample sets"}),
        curves=report(f"{RUN}/report/training_curves.png", caption="pipeline/report/curves.rst", category="Training"),
        studies=[report(f"{RUN}/report/{s}.tsv", caption=STUDY_CAPTIONS[s], category="Studies", labels={"study": s}) for s in STUDIES],
        scaling_plot=[report(f"{RUN}/report/scaling.png", caption="pipeline/report/scaling_plot.rst", category="Studies", labels={"study": "scaling plot"})] if "scaling" in STUDIES else [],
    params:
        run=run_dir,
        cfg=stage_config("evaluate"),
    log:
        f"{RUN}/logs/evaluate.log",
    conda:
        CONDA_ENV
    threads: CORES
    resources:
        gpu=1,
        dispatch=DISPATCH,
    shell:
        "python -m pipeline evaluate --run {params.run:q} --threads {threads} --config-json {params.cfg:q} {resources.dispatch} 2>&1 | tee {log:q}"


rule timings:
    input:
        f"{RUN}/data/dataset.h5",
        f"{RUN}/vqvae/metrics.json",
        f"{RUN}/latents/latents.h5",
        expand(f"{RUN}/samples/{{model}}.json", model=MODELS),
        f"{RUN}/report/metrics.json",
    output:
        f"{RUN}/timings.json",
    params:
        run=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{RUN}/logs/timings.log",
    conda:
        CONDA_ENV
    localrule: True
    shell:
        "python -m pipeline timings --run {params.run:q} > {log:q} 2>&1"
