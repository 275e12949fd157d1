# vq-latent-pipeline: prepare_data -> train_vqvae -> extract_latents -> train_pixelcnn + train_diffusion
#                     -> sample (one job per sample set) -> evaluate (judged by train_classifier / train_simclr) -> timings
#                     (+ train_pixel_diffusion, the pixel-space baseline, when a pixeldiff_* set is listed)
#
#   snakemake --report results/default/report.html   # Snakemake's report: grids, curves, tables
#   snakemake --cores 2                           # the whole chain on the embedded default data
#   snakemake --config run=try2 --cores 2         # writes to results/try2/
#   snakemake --forcerun train_diffusion --cores 2
#   snakemake --configfile my.yaml --cores 2      # merged over pipeline/configs/default.yaml
#
# The rules are in rules/*.smk (helpers in rules/common.smk). Each rule's params is its config section: changing one section re-runs that stage and what
# depends on it, nothing else. Every stage runs `python -m pipeline <stage>` with that part of the
# validated config as JSON, so the same command works without Snakemake. This file never
# imports torch.
import json
import os
import sys

from snakemake.utils import min_version, validate

sys.path.insert(0, workflow.basedir)
from pipeline.config import (  # pyyaml only: the Snakefile never imports torch
    ConfigError,
    check_renamed,
    coerce_strings,
    stage_view,
    variant_config,
)
from pipeline.dispatch import shell_args  # submitit and yaml, no torch
from pipeline.sets import SAMPLE_SET_PATTERN, parse_sample_set, studies_for  # no torch
from pipeline.sources import judges  # numpy only

min_version("9.0")


report: "pipeline/report/workflow.rst"


# Packaged defaults first; --configfile and --config are merged over them.
configfile: os.path.join(workflow.basedir, "pipeline", "configs", "default.yaml")


include: "rules/common.smk"


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
try:
    check_renamed(config)  # an old key: one line naming the new one
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
validate(config, os.path.join(workflow.basedir, "pipeline", "configs", "schema.yaml"))

# `python -m pipeline plan` reads the resolved config of its dry run from here.
_plan_config = os.environ.get("VQLP_PLAN_CONFIG")
if _plan_config:
    with open(_plan_config, "w") as _f:
        json.dump(config, _f)

RUN = f"results/{config['run']}"
SAMPLE_SETS = config["sample"]["sets"]
# The evaluate stage's judges: the digit classifier (labelled data) and/or the label-free encoder.
JUDGES = judges(config)
JUDGE_MODELS = [f"{RUN}/{'classifier' if j == 'classifier' else 'simclr'}/model.pt" for j in JUDGES]
MODEL_FOLDERS = sorted({parse_sample_set(m).model_folder for m in SAMPLE_SETS})  # pixelcnn, diffusion_cond, ...
STUDIES = studies_for(SAMPLE_SETS)
# envs/cpu.yaml here; the Big Red 200 profile sets envs/cuda.yaml
CONDA_ENV = os.path.join(workflow.basedir, config["conda_env"])
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
    _dry = any(
        a in ("--dry-run", "--dryrun", "--lint") or (a.startswith("-") and not a.startswith("--") and "n" in a[1:])
        for a in sys.argv[1:]
    )
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
SAMPLE_IN_ONE_JOB = bool(SLURM["enabled"] and SLURM["sample_in_one_job"])


rule all:
    default_target: True
    input:
        expand(f"{RUN}/samples/{{sample_set}}.png", sample_set=SAMPLE_SETS),
        expand(f"{RUN}/samples/{{sample_set}}.npy", sample_set=SAMPLE_SETS),
        f"{RUN}/vqvae/reconstructions.png",
        f"{RUN}/report/metrics.json",
        f"{RUN}/report/summary.md",
        f"{RUN}/timings.json",


include: "rules/data.smk"
include: "rules/priors.smk"
include: "rules/report.smk"
