"""Configuration: packaged defaults + user YAML + JSON + dotted overrides, validated.

One source of truth (nanoGPT's configurator, dinov2's ``write_config``): the packaged
``configs/default.yaml`` is deep-merged with any user files, then with a JSON object (what the
Snakefile passes), then with ``--set key.sub=value`` overrides; the result is validated against
``configs/schema.yaml`` (the same schema the Snakefile hands to ``snakemake.utils.validate``).
Unknown keys are rejected with the closest valid key named.

This module is a leaf: it imports neither torch nor h5py.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.stages import TABLE

__all__ = [
    "ConfigError",
    "SCHEMA_PATH",
    "DEFAULT_PATH",
    "load_default",
    "load_schema",
    "deep_merge",
    "parse_override",
    "resolve",
    "validate",
    "write_config",
    "STAGE_SECTIONS",
    "coerce_strings",
    "stage_view",
    "CONDITIONAL_KEYS",
    "variant_config",
    "RENAMED_KEYS",
    "check_renamed",
]

CONFIG_DIR = Path(str(resources.files("pipeline") / "configs"))
DEFAULT_PATH = CONFIG_DIR / "default.yaml"
SCHEMA_PATH = CONFIG_DIR / "schema.yaml"

#: The config section each stage reads (besides the top-level keys run/device/bf16).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {s.name: s.sections for s in TABLE}


#: Top-level keys every stage reads.
TOP_LEVEL_KEYS = (
    "run",
    "device",
    "bf16",
    "tf32",
    "cudnn_benchmark",
    "deterministic",
    "tensorboard",
    "data_loading",
    "data_workers",
)


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message names it and what was expected."""


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load_default() -> dict:
    """The packaged default config as a fresh dict."""
    return _read_yaml(DEFAULT_PATH)


def load_schema() -> dict:
    """The JSON Schema (as a dict) that both Snakemake and :func:`validate` use."""
    return _read_yaml(SCHEMA_PATH)


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Return ``base`` recursively updated by ``update`` (neither is modified).

    Mappings merge key by key; any other value (lists included) replaces the old one.
    """
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> dict:
    """Turn ``"vqvae.steps=100"`` into ``{"vqvae": {"steps": 100}}``.

    The value is parsed as YAML, so ``true``, ``1e-3``, ``[1, 2]`` and ``null`` get their types.

    Raises:
        ConfigError: if ``item`` has no ``=`` or an empty key.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _check_unknown(cfg: Mapping, schema: Mapping, prefix: str = "") -> None:
    props = schema.get("properties")
    if props is None or schema.get("additionalProperties", True) is not False:
        return
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if key not in props:
            valid = [f"{prefix}{k}" for k in props]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        sub = props[key]
        if isinstance(value, Mapping) and isinstance(sub, Mapping):
            _check_unknown(value, sub, prefix=f"{dotted}.")


def _types(schema: Mapping, root: Mapping) -> set:
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    t = schema.get("type", [])
    types = set([t] if isinstance(t, str) else t)
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):  # e.g. a number or "auto"
        types |= _types(branch, root)
    return types


def coerce_strings(cfg: Any, schema: Mapping | None = None, _root: Mapping | None = None) -> Any:
    """Read string values as YAML scalars where the schema expects a number, boolean or null.

    Snakemake parses nested ``--config key={sub: 1}`` values with YAML's BaseLoader, so every
    nested value arrives as a string; this turns ``"21"`` back into 21 where an integer is
    expected (and leaves strings the schema wants as strings alone). Returns a new object.
    """
    schema = load_schema() if schema is None else schema
    root = schema if _root is None else _root
    if isinstance(cfg, Mapping):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in cfg.items():
            sub = props.get(k, extra if isinstance(extra, Mapping) else {})
            out[k] = coerce_strings(v, sub, root)
        return out
    if isinstance(cfg, list):
        return [coerce_strings(v, schema.get("items", {}), root) for v in cfg]
    if isinstance(cfg, str) and _types(schema, root) & {"integer", "number", "boolean", "null", "array"}:
        try:
            value = yaml.safe_load(cfg)
        except yaml.YAMLError:
            return cfg
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return cfg
        return coerce_strings(value, schema, root) if isinstance(value, list) else value
    return cfg


#: config keys that were renamed (dotted old key -> new key): a config that still has the old
#: key fails with one line naming the new one, instead of "unknown key"
RENAMED_KEYS = {
    "sample.models": "sample.sets",
    "pixelcnn.guide_snapshot": "pixelcnn.guide_fraction",
    "diffusion.guide_snapshot": "diffusion.guide_fraction",
    "encoder": "simclr",
}


def check_renamed(cfg: Mapping) -> None:
    """Refuse a renamed key (:data:`RENAMED_KEYS`).

    Raises:
        ConfigError: ``config key 'sample.models' was renamed to 'sample.sets'; ...``.
    """
    for old, new in RENAMED_KEYS.items():
        node: object = cfg
        for part in old.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING:
            raise ConfigError(f"config key {old!r} was renamed to {new!r}; rename it in your config file or --set")


_MISSING = object()


def validate(cfg: Mapping, schema: Mapping | None = None) -> None:
    """Check ``cfg`` against the schema.

    Raises:
        ConfigError: naming a renamed key and its new name, the first unknown key (with the
            closest valid key) or the first key whose value has the wrong type or range, with
            what was expected.
    """
    import jsonschema

    schema = load_schema() if schema is None else schema
    check_renamed(cfg)
    _check_unknown(cfg, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.path) or "<top level>"
        if list(err.path)[:2] == ["sample", "sets"] and err.validator == "pattern":
            from pipeline.sets import parse_sample_set

            try:
                parse_sample_set(str(err.instance))
            except ValueError as exc:  # the grammar in words, not the regular expression
                raise ConfigError(f"config key {where!r}: {exc}") from None
        raise ConfigError(f"config key {where!r}: {err.message}")


def resolve(
    files: Iterable[str | os.PathLike] = (),
    json_text: str | None = None,
    overrides: Iterable[str] = (),
    base: Mapping | None = None,
) -> dict:
    """Build the resolved config: defaults <- YAML files <- JSON object <- dotted overrides.

    Args:
        files: user YAML files, merged in order.
        json_text: a JSON object (the Snakefile passes the whole Snakemake config this way).
        overrides: ``key.sub=value`` strings.
        base: start from this dict instead of the packaged defaults.

    Returns:
        The validated config dict.

    Raises:
        ConfigError: unreadable file, bad JSON, unknown key (closest valid key named),
            wrong type or out-of-range value.
    """
    cfg = load_default() if base is None else copy.deepcopy(dict(base))
    schema = load_schema()
    for f in files:
        user = _read_yaml(f)
        _check_unknown(user, schema)
        cfg = deep_merge(cfg, user)
    if json_text:
        try:
            obj = json.loads(json_text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ConfigError("--config-json must be a JSON object")
        cfg = deep_merge(cfg, obj)
    for item in overrides:
        cfg = deep_merge(cfg, parse_override(item))
    validate(cfg, schema)
    return cfg


def stage_view(cfg: Mapping, stage: str) -> dict:
    """The part of ``cfg`` a stage reads: the top-level scalars and the stage's own section(s)."""
    sections = STAGE_SECTIONS[stage]
    view = {k: cfg[k] for k in TOP_LEVEL_KEYS if k in cfg}
    for section in (sections,) if isinstance(sections, str) else sections:
        view[section] = copy.deepcopy(cfg[section])
    return view


#: Keys of a prior's section that only its class-conditional variant reads.
CONDITIONAL_KEYS = ("label_dropout", "conditional_steps")


def variant_config(cfg: Mapping, section: str, conditional: bool = False, budget: float | None = None) -> dict:
    """``cfg`` as one model variant of the prior ``section`` ("pixelcnn" or "diffusion") reads it.

    The unconditional model (the study's subject; sets without ``_g``) reads the section without
    ``label_dropout`` and ``conditional_steps``; the class-conditional variant (``<prior>_cond/``,
    sets ``_g<s>``) reads ``steps = conditional_steps`` (and keeps ``conditional_steps``, so that
    the function is idempotent: the stage applies it again to the Snakefile's params, which are
    merged over the packaged defaults) and ``label_dropout``. A training budget
    f != 1 (the quality-vs-compute study's ``_b<f>`` models) scales ``steps`` (rounded, >= 1). The
    result is what the stage writes as its ``config.yaml`` and what the Snakefile uses as the rule's
    params, so a key re-runs exactly the variants that read it.

    Raises:
        ConfigError: budget <= 0.
    """
    out = copy.deepcopy(dict(cfg))
    values = dict(out[section])
    cond_steps = values.pop("conditional_steps", None)
    dropout = values.pop("label_dropout", None)
    if conditional:
        values["steps"] = int(cond_steps if cond_steps is not None else values["steps"])
        # kept (equal to steps) so that applying this again to the result, as the stage does to
        # the Snakefile's params over the packaged defaults, keeps these steps
        values["conditional_steps"] = values["steps"]
        values["label_dropout"] = float(dropout or 0.0)
    if budget is not None and float(budget) != 1.0:
        if not float(budget) > 0:
            raise ConfigError(f"training budget must be > 0, got {budget}")
        values["steps"] = max(1, int(round(int(values["steps"]) * float(budget))))
    out[section] = values
    return out


def write_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (temporary file, then rename)."""
    from pipeline.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
