"""Config: the seed's defaults, every shipped YAML file, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_llm.config import Config, ConfigError, describe_keys, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_seeds():
    cfg = Config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert cfg.model.quantization == "nf4" and cfg.model.double_quant is True
    assert cfg.model.name == "mistralai/Mistral-7B-Instruct-v0.2" and cfg.model.template == "default"
    # ...which is the seed's [INST] format for the seed's model (its tokenizer ships for offline use).
    from qlora_llm.model import load_tokenizer
    from qlora_llm.templates import resolve_template

    assert resolve_template(cfg.model.template, load_tokenizer(cfg.model.name)) == "mistral"
    assert cfg.train.optim == "paged_adamw_32bit"
    assert cfg.train.early_stopping_patience == 3
    assert cfg.train.save_steps == 50 and cfg.train.group_by_length
    assert cfg.train.gradient_checkpointing == "auto"  # the seed says on; the plan turns it on where needed
    assert cfg.data.eval_fraction == 0.1
    assert (cfg.serve.temperature, cfg.serve.top_p, cfg.serve.max_new_tokens) == (0.7, 0.9, 512)


def test_every_key_has_a_description():
    rows = describe_keys()
    assert len(rows) > 40
    missing = [key for key, _, about in rows if not about]
    assert missing == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid_and_only_override(path):
    cfg = load_config(path)
    tree = yaml.safe_load(path.read_text())
    defaults = Config().model_dump(mode="json")
    resolved = cfg.model_dump(mode="json")
    for section, body in tree.items():
        for key, value in body.items():
            assert resolved[section][key] == value
    # A config that restates a default is noise: it hides what the file is really about.
    restated = [
        f"{s}.{k}"
        for s, body in tree.items()
        for k, v in body.items()
        if defaults[s][k] == v and k not in ("name", "template", "train_file", "max_seq_length")
    ]
    assert len(restated) <= 3, restated


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"smollm2-cpu.yaml", "mistral-7b-8gb.yaml"}


def test_overrides_are_typed_and_win(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        ["train.max_steps=7", "lora.r=8", "model.quantization=none", "lora.target_modules=[q_proj]"],
    )
    assert cfg.train.max_steps == 7 and cfg.lora.r == 8
    assert cfg.model.quantization == "none" and cfg.lora.target_modules == ["q_proj"]


def test_unknown_key_in_file_names_key_file_and_near_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: unknown key 'train.max_stepz'. Did you mean 'train.max_steps'?"


def test_unknown_section_and_override_named():
    with pytest.raises(ConfigError, match=r"override 'trian.max_steps=3': unknown section 'trian'"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"override 'lora.rank=8': unknown key 'lora.rank'"):
        load_config(None, ["lora.rank=8"])


def test_wrong_type_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  r: sixteen\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: lora.r: Input should be a valid integer")
    assert "'sixteen'" in str(err.value)


def test_bad_choice_and_range_rejected():
    with pytest.raises(ConfigError, match="model.quantization: Input should be 'nf4', 'fp4' or 'none'"):
        load_config(None, ["model.quantization=int3"])
    with pytest.raises(ConfigError, match="serve.temperature"):
        load_config(None, ["serve.temperature=5"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 3\n lora: [\n")
    with pytest.raises(ConfigError, match=rf"{path}, line \d+: not valid YAML"):
        load_config(path)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "smollm2-cpu.yaml", ["train.max_steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def _an_element(section: str, key: str):
    """A value one element of this list field may take: its default's first, else a Literal's first."""
    import typing

    from qlora_llm.config import SECTIONS

    field = SECTIONS[section].model_fields[key]
    default = field.get_default(call_default_factory=True)
    if default:
        return default[0]
    (arg,) = typing.get_args(field.annotation)
    return typing.get_args(arg)[0] if typing.get_origin(arg) is typing.Literal else "x"


def test_every_list_field_takes_one_value_as_a_list_of_one(tmp_path):
    """`train.report_to=tensorboard` is `[tensorboard]`, as transformers takes report_to: every list field,
    from an override and from a YAML file, found from the models so a new list field is covered too."""
    from qlora_llm.config import SECTIONS, list_fields

    fields = [(s, k) for s, cls in SECTIONS.items() for k in sorted(list_fields(cls))]
    assert ("train", "report_to") in fields and ("lora", "target_modules") in fields
    for section, key in fields:
        value = _an_element(section, key)
        one = load_config(None, [f"{section}.{key}={value}"])
        listed = load_config(None, [f"{section}.{key}=[{value}]"])
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({section: {key: value}}))
        from_file = load_config(tmp_path / "c.yaml")
        got = [getattr(getattr(c, section), key) for c in (one, listed, from_file)]
        assert got == [[value]] * 3, (section, key, got)


def test_a_wrong_single_value_for_a_list_field_is_still_refused_by_name():
    with pytest.raises(
        ConfigError, match=r"override 'train.report_to=tensorbored': train.report_to.0: Input"
    ):
        load_config(None, ["train.report_to=tensorbored"])
