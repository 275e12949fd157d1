# Helpers of the rules (included by the Snakefile first): the site-config guard, the params of each rule
# (the part of the config its stage reads), and the one shell command every stage rule runs.


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
    rest = variant[len("cond") :].lstrip("_") if conditional else variant
    return conditional, (float(rest[1:]) if rest else None)


def variant_params(wildcards):
    """The variant's view of its section before the budget is applied: the stage applies
    ``--budget`` itself (applying it here too would scale the steps twice); the budget is in
    the output path, so a changed budget is a new model anyway."""
    conditional, _ = parse_variant(wildcards.variant)
    return variant_stage_config(wildcards.prior, conditional)


def variant_flags(wildcards):
    conditional, budget = parse_variant(wildcards.variant)
    return " ".join(
        (["--conditional"] if conditional else []) + ([f"--budget {budget:g}"] if budget is not None else [])
    )


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


def sampler_inputs_of(name):
    """The trained model sample set ``name`` needs, plus the VQ-VAE that decodes latent codes."""
    spec = parse_sample_set(name)
    vqvae = [] if spec.prior == "pixeldiff" else [f"{RUN}/vqvae/model.pt"]
    return vqvae + [f"{RUN}/{spec.model_folder}/model.pt"]


def sampler_inputs(wildcards):
    """:func:`sampler_inputs_of` the rule's sample set."""
    return sampler_inputs_of(wildcards.sample_set)


def sample_params(wildcards):
    """The sample rule's params: :func:`sample_config` of its set."""
    return sample_config(wildcards.sample_set)


def timings_run_dir(wildcards, output):
    """results/<run>, from the timings rule's output results/<run>/timings.json."""
    return os.path.dirname(output[0])


def stage_shell(stage, extra="", dispatch=True):
    """The command of a stage rule: ``python -m pipeline <stage> [extra] --run ... --threads ...
    --config-json <params.cfg> [dispatch flags]``, logged to the rule's log (``tee``). ``stage``
    and ``extra`` may hold Snakemake placeholders such as ``{wildcards.sample_set}``."""
    words = ["python -m pipeline", stage] + ([extra] if extra else [])
    words += ["--run {params.run:q} --threads {threads} --config-json {params.cfg:q}"]
    words += ["{resources.dispatch}"] if dispatch else []
    return " ".join(words) + " 2>&1 | tee {log:q}"
