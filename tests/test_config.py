"""Configs: defaults live in the dataclasses; YAML and key=value override; bad input fails early."""

import re
from pathlib import Path

import pytest
import yaml

from slimtune.config import Config, build_config, load_config
from slimtune.errors import ConfigError
from slimtune.train.loop import check_machine

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("**/*.yaml"))
CONFIGS = [p for p in CONFIGS if "sweeps" not in p.parts]


def test_shipped_configs_are_found():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "kl_sft", "dora", "full", "ia3", "qlora"} <= names, names


def test_presets_say_what_they_reached():
    """The study's three presets exist and each states the held-out loss and KL it reached."""
    presets = {p.stem: p.read_text() for p in CONFIGS if p.parent.name == "presets"}
    assert set(presets) == {"best_quality", "best_efficiency", "most_surgical"}
    for name, text in presets.items():
        head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        assert re.search(r"held-out loss \d\.\d+ -> \d\.\d+", head), name
        assert re.search(r"KL to base \d\.\d+", head) and "docs/study.md" in head, name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():  # every key written in the file arrived
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    check_machine(cfg)  # runs here: qlora too (bitsandbytes quantises on this CPU)


def test_overrides_and_types():
    cfg = load_config(None, ["train.lr=3e-4", "method.targets=[q_proj, v_proj]", "train.max_steps=none",
                             "data.packing=true", "method.layers=10-20", "train.betas=[0.9, 0.95]"])
    assert cfg.train.lr == 3e-4 and cfg.method.targets == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None and cfg.data.packing is True and cfg.method.layers == "10-20"
    assert cfg.train.betas == [0.9, 0.95]
    assert Config().train.lr == 2e-4  # the dataclass is the one source of defaults


@pytest.mark.parametrize("override, match", [
    ("train.optimzer=adamw", "unknown key 'train.optimzer'; valid keys: output_dir"),
    ("train.optimizer=sgd", "choose one of: adamw, adafactor, lion, schedulefree"),
    ("method.name=lokr", "choose one of: lora, rslora, dora"),
    ("train.lr=fast", "train.lr"),
    ("train.max_steps=2.5", "expected an integer"),
    ("data.packing=maybe", "true or false"),
    ("trian.lr=1", "unknown config section 'trian'"),
    ("lr=1", "section.key=value"),
    ("loss.kl_direction=sideways", "forward, reverse, jsd"),
])
def test_bad_values_fail_before_any_model_loads(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("model: {nam: x}\n")
    with pytest.raises(ConfigError, match="unknown key 'model.nam'"):
        load_config(p)


def test_saved_config_round_trips(tmp_path):
    cfg = build_config({"method": {"targets": ["q_proj"]}}, ["train.lr=1e-3"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_every_config_field_has_a_docstring():
    """The dataclasses are the documentation: a string literal right after every field."""
    import ast
    import inspect

    import slimtune.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Cfg")):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    missing.append(f"{cls.name}.{node.target.id}")
    assert not missing, f"config fields without a docstring: {missing}"


def test_saved_config_writes_every_default_resolved(tmp_path):
    cfg = Config().resolved("cpu")
    cfg.save(tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert saved["train"]["micro_batch_tokens"] == 1024  # the CPU default, written out
    assert Config().resolved("cuda").train.micro_batch_tokens == 0
    assert build_config({}, ["train.micro_batch_tokens=512"]).resolved("cpu").train.micro_batch_tokens == 512


def test_column_fields_are_every_formats_keys():
    """config.COLUMN_FIELDS (what data.columns may map; config imports no data module) equals the
    keys the data formats read."""
    from slimtune.config import COLUMN_FIELDS
    from slimtune.data.formats import SIGNATURES

    assert sorted(COLUMN_FIELDS) == sorted({k for keys in SIGNATURES.values() for k in keys} | {"input", "context"})
