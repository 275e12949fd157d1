import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import STAGE_TOP_LEVEL

from pipeline.config import (
    DEFAULT_PATH,
    SCHEMA_PATH,
    ConfigError,
    deep_merge,
    load_default,
    parse_override,
    resolve,
    stage_view,
    variant_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_valid():
    cfg = resolve()
    assert cfg == load_default()
    assert cfg["vqvae"]["num_embeddings"] >= 128 and cfg["vqvae"]["embedding_dim"] >= 16


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'vqvae.stepz'; did you mean 'vqvae.steps'"):
        resolve(overrides=["vqvae.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'diffusoin'; did you mean 'diffusion'"):
        resolve(json_text=json.dumps({"diffusoin": {"steps": 1}}))


def test_unknown_key_in_user_file_names_key(tmp_path):
    f = tmp_path / "user.yaml"
    f.write_text("pixelcnn:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"pixelcnn.num_layer.*pixelcnn.num_layers"):
        resolve([f])


@pytest.mark.parametrize(
    "override, message",
    [
        ("vqvae.steps=0", r"'vqvae.steps': 0 is less than the minimum of 1"),
        ("vqvae.steps=ten", r"'vqvae.steps': 'ten' is not of type 'integer'"),
        ("diffusion.schedule=quadratic", r"'diffusion.schedule': 'quadratic' is not one of"),
        ("device=tpu", r"'device': 'tpu' is not one of"),
        (
            "sample.sets=[vae]",
            r"'sample.sets.0': unknown sample set 'vae'; expected "
            r"pixelcnn\[_greedy\|_t<tau>\]\[_g<s>\|_ag<w>\]\[_b<f>\]",
        ),
        ("sample.sets=[pixeldiff_ddim_g2]", r"unknown sample set 'pixeldiff_ddim_g2'"),
        ("run=a b", r"'run': 'a b' does not match"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(overrides=[override])


def test_override_types_and_merge():
    assert parse_override("diffusion.channel_mult=[1, 2]") == {"diffusion": {"channel_mult": [1, 2]}}
    assert parse_override("data.path=null") == {"data": {"path": None}}
    cfg = resolve(overrides=["vqvae.lr=3e-4", "sample.temperature=0.8"])
    assert cfg["vqvae"]["lr"] == pytest.approx(3e-4) and cfg["sample"]["temperature"] == 0.8
    assert cfg["vqvae"]["steps"] == load_default()["vqvae"]["steps"]
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("vqvae.steps")


def test_deep_merge_does_not_mutate():
    a = {"x": {"y": 1, "z": 2}}
    b = deep_merge(a, {"x": {"y": 3}})
    assert b == {"x": {"y": 3, "z": 2}} and a == {"x": {"y": 1, "z": 2}}


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("vqvae: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve([bad])


def test_stage_view_holds_only_its_section():
    view = stage_view(resolve(), "train_diffusion")
    assert set(view) == STAGE_TOP_LEVEL | {"diffusion"}


@pytest.mark.parametrize("section", ["pixelcnn", "diffusion"])
def test_the_conditional_variant_keeps_its_steps_through_the_snakefile_params(section):
    """The Snakefile passes variant_config's result as --config-json, which the stage merges over
    the packaged defaults and hands to variant_config again: the steps must survive (they once
    fell back to the default's conditional_steps, 800 / 1000 steps in a 20-step tiny config)."""
    user = resolve(overrides=[f"{section}.steps=30", f"{section}.conditional_steps=20"])
    for budget in (None, 0.5):
        params = variant_config(user, section, conditional=True)
        stage = variant_config(resolve(json_text=json.dumps(params)), section, conditional=True, budget=budget)
        assert stage[section]["steps"] == (20 if budget is None else 10)
        assert stage[section]["label_dropout"] == user[section]["label_dropout"]
    plain = variant_config(resolve(json_text=json.dumps(variant_config(user, section))), section)
    assert plain[section]["steps"] == 30 and "conditional_steps" not in plain[section]


def test_schema_and_default_cover_the_same_keys():
    """Every default key is in the schema and every schema section key has a default."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    default = yaml.safe_load(DEFAULT_PATH.read_text())
    assert set(schema["properties"]) == set(default)
    for section, sub in schema["properties"].items():
        if "properties" in sub:
            assert set(sub["properties"]) == set(default[section]), section


def test_config_reference_documents_every_key_with_its_default():
    """docs/config.md has one row per key of default.yaml (no more, no fewer), and each row's
    default is default.yaml's value: the reference cannot go stale."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", doc, re.M))
    default = yaml.safe_load(DEFAULT_PATH.read_text())
    flat = {f"{s}.{k}": v for s, sub in default.items() if isinstance(sub, dict) for k, v in sub.items()}
    flat.update({k: v for k, v in default.items() if not isinstance(v, dict)})
    assert set(rows) == set(flat), f"missing {sorted(set(flat) - set(rows))}, unknown {sorted(set(rows) - set(flat))}"
    wrong = {k: (rows[k], flat[k]) for k in flat if yaml.safe_load(rows[k]) != flat[k]}
    assert not wrong, f"defaults in docs/config.md differ from default.yaml: {wrong}"


def test_schema_pattern_is_the_sample_set_grammar():
    from pipeline.sets import SAMPLE_SET_PATTERN, parse_sample_set, studies_for

    schema = yaml.safe_load((DEFAULT_PATH.parent / "schema.yaml").read_text())
    assert schema["properties"]["sample"]["properties"]["sets"]["items"]["pattern"] == f"^(?:{SAMPLE_SET_PATTERN})$"
    spec = parse_sample_set("diffusion_ddim_s25_raw_g3")
    assert (spec.prior, spec.method, spec.steps, spec.weights, spec.guidance) == ("diffusion", "ddim", 25, "raw", 3.0)
    assert (
        parse_sample_set("pixelcnn_t0.8").temperature == 0.8 and parse_sample_set("pixelcnn_greedy").method == "greedy"
    )
    assert not parse_sample_set("diffusion_ddpm").conditional and parse_sample_set("pixelcnn_g1").conditional
    for bad in ("diffusion_ddpm_s10", "pixeldiff_ddim_g1", "pixelcnn_t0", "vae"):
        with pytest.raises(ValueError, match="unknown sample set|must be > 0"):
            parse_sample_set(bad)
    assert studies_for(["pixelcnn", "diffusion_ddim"]) == []
    assert studies_for(
        ["pixelcnn_greedy", "diffusion_ddim", "diffusion_ddpm", "pixeldiff_ddim", "diffusion_ddim_g2"]
    ) == ["sampling_layer", "diffusion_steps", "latent_vs_pixel", "guidance"]


def test_sample_set_grammar_for_solvers_autoguidance_and_budgets():
    from pipeline.sets import base_name, parse_sample_set, prior_folder, studies_for

    spec = parse_sample_set("diffusion_dpmsde_s40_ag2.5_b0.25")
    assert (spec.method, spec.steps, spec.autoguidance, spec.budget, spec.conditional) == (
        "dpmsde",
        40,
        2.5,
        0.25,
        False,
    )
    assert spec.model_folder == "diffusion_b0.25" and base_name(spec.name) == "diffusion_dpmsde_s40_ag2.5"
    assert (
        parse_sample_set("pixelcnn_ag2").autoguidance == 2.0
        and parse_sample_set("pixelcnn_ag2").model_folder == "pixelcnn"
    )
    assert (
        parse_sample_set("pixelcnn_b1").model_folder == "pixelcnn"
        and parse_sample_set("pixelcnn_b4").model_folder == "pixelcnn_b4"
    )
    assert prior_folder("pixeldiff") == "pixel_diffusion" and prior_folder("diffusion", 0.5) == "diffusion_b0.5"
    for bad in ("diffusion_dpmpp_g2_ag2", "pixeldiff_ddim_b2", "diffusion_ddim_b0", "diffusion_plms", "pixelcnn_ag"):
        with pytest.raises(ValueError, match="unknown sample set|must be > 0"):
            parse_sample_set(bad)
    assert studies_for(["pixelcnn", "pixelcnn_b4", "diffusion_dpmsde", "diffusion_dpmsde_b4"]) == ["scaling"]
    # budget sets appear only in the scaling study
    assert studies_for(["diffusion_ddim", "diffusion_ddim_b2"]) == ["scaling"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("sample.models=[pixelcnn]", "sample.sets"),
        ("pixelcnn.guide_snapshot=0.3", "pixelcnn.guide_fraction"),
        ("diffusion.guide_snapshot=0.3", "diffusion.guide_fraction"),
        ("encoder.steps=5", "simclr"),
    ],
)
def test_an_old_key_fails_with_one_line_naming_the_new_key(old, new):
    key = old.split("=")[0] if not old.startswith("encoder") else "encoder"
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}' was renamed to '{re.escape(new)}'"):
        resolve(overrides=[old])


def test_snakemake_names_the_new_key_of_an_old_one(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--config", "sample={models: [pixelcnn]}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "config key 'sample.models' was renamed to 'sample.sets'" in proc.stdout + proc.stderr
