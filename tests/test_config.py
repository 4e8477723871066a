"""Tests for mdpo.config: strict YAML loading, overrides, and save/load round-trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mdpo.config import (
    CHOICES,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    save_config,
)

SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "gemma7b_mdpo.yaml"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg  # errors are one line
    return msg


# ---------------------------------------------------------------- shipped experiment
def test_shipped_yaml_has_paper_values():
    cfg = load_config(SHIPPED)
    assert cfg.name == "gemma7b_mdpo"
    assert cfg.loss.type == "mdpo" and cfg.loss.beta == 0.1 and cfg.loss.mask == "model"
    assert cfg.optimizer.lr == pytest.approx(4e-7) and isinstance(cfg.optimizer.lr, float)
    assert cfg.training.schedule == "cosine"
    assert cfg.training.warmup_steps == 40
    assert cfg.training.global_batch_size == 32
    assert cfg.training.epochs == 1.0 and cfg.training.iterations == 3
    assert cfg.rollout.n_current == 20 and cfg.rollout.n_previous == 10
    assert cfg.rollout.temperature == 1.0
    assert cfg.rollout.max_new_tokens_per_turn == 512
    assert cfg.rollout.max_turns == 6 and cfg.rollout.max_length == 2048
    assert cfg.reference.mode == "previous"
    assert cfg.data.train == ["gsm8k", "math"] and cfg.data.max_prompts is None


def test_shipped_yaml_sets_every_key_and_matches_defaults():
    raw = yaml.safe_load(SHIPPED.read_text())
    defaults = config_to_dict(ExperimentConfig())
    for section, body in defaults.items():
        if section == "name":
            continue
        assert set(raw[section]) == set(body), section
    # The dataclass defaults are the same recipe as the shipped file.
    assert config_to_dict(load_config(SHIPPED)) == {**defaults, "name": "gemma7b_mdpo"}


def test_shipped_yaml_starts_with_command_comment():
    assert SHIPPED.read_text().splitlines()[0] == "# make train EXP=gemma7b_mdpo"


def test_choice_defaults_are_allowed():
    cfg = ExperimentConfig()
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) in allowed, key


# ---------------------------------------------------------------- loading
def test_name_defaults_to_file_stem_and_missing_sections_default(tmp_path):
    cfg = load_config(write(tmp_path, "loss:\n  beta: 0.2\n", "my_run.yaml"))
    assert cfg.name == "my_run"
    assert cfg.loss.beta == 0.2
    assert cfg.optimizer == ExperimentConfig().optimizer


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "loss:\n  bta: 0.1\n")
    msg = error_of(path)
    assert msg == f"{path}: unknown key 'loss.bta' (did you mean 'loss.beta'?)"


def test_key_in_wrong_section_suggests_right_section(tmp_path):
    msg = error_of(write(tmp_path, "loss:\n  lr: 1.0e-6\n"))
    assert "unknown key 'loss.lr'" in msg and "did you mean 'optimizer.lr'" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, "losss:\n  beta: 0.1\n")
    msg = error_of(path)
    assert msg.startswith(str(path)) and "unknown section 'losss'" in msg
    assert "did you mean 'loss'" in msg


def test_section_not_a_mapping(tmp_path):
    msg = error_of(write(tmp_path, "loss: 0.1\n"))
    assert "loss: expected a mapping" in msg


def test_wrong_type_str_for_float(tmp_path):
    path = write(tmp_path, "loss:\n  beta: abc\n")
    assert error_of(path) == f"{path}: loss.beta: expected float, got str 'abc'"


def test_bool_rejected_for_int_and_float(tmp_path):
    msg = error_of(write(tmp_path, "training:\n  iterations: true\n"))
    assert "training.iterations: expected int, got bool True" in msg
    msg = error_of(write(tmp_path, "loss:\n  beta: false\n"))
    assert "loss.beta: expected float, got bool False" in msg


def test_float_rejected_for_int(tmp_path):
    msg = error_of(write(tmp_path, "rollout:\n  max_turns: 6.5\n"))
    assert "rollout.max_turns: expected int, got float 6.5" in msg


def test_list_element_wrong_type(tmp_path):
    msg = error_of(write(tmp_path, "data:\n  train: [gsm8k, 3]\n"))
    assert "data.train[1]: expected str, got int 3" in msg
    msg = error_of(write(tmp_path, "optimizer:\n  betas: [0.9, yes]\n"))
    assert "optimizer.betas[1]: expected float, got bool True" in msg
    msg = error_of(write(tmp_path, "data:\n  train: gsm8k\n"))
    assert "data.train: expected list[str], got str 'gsm8k'" in msg


def test_null_only_for_optional(tmp_path):
    assert load_config(write(tmp_path, "data:\n  max_prompts: null\n")).data.max_prompts is None
    assert load_config(write(tmp_path, "data:\n  max_prompts: 100\n")).data.max_prompts == 100
    msg = error_of(write(tmp_path, "loss:\n  beta: null\n"))
    assert "loss.beta: expected float, got null" in msg
    msg = error_of(write(tmp_path, "data:\n  max_prompts: lots\n"))
    assert "data.max_prompts: expected int or null, got str 'lots'" in msg


def test_int_accepted_for_float_and_converted(tmp_path):
    cfg = load_config(write(tmp_path, "loss:\n  beta: 1\noptimizer:\n  betas: [1, 0]\n"))
    assert cfg.loss.beta == 1.0 and type(cfg.loss.beta) is float
    assert cfg.optimizer.betas == [1.0, 0.0] and all(type(b) is float for b in cfg.optimizer.betas)


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) would read `4e-7` as a string; the loader treats it as a float.
    cfg = load_config(write(tmp_path, "optimizer:\n  lr: 4e-7\n  eps: 1E-8\n"))
    assert cfg.optimizer.lr == pytest.approx(4e-7) and cfg.optimizer.eps == pytest.approx(1e-8)


def test_invalid_choice_names_key_and_allowed_values(tmp_path):
    msg = error_of(write(tmp_path, "loss:\n  type: dpo\n"))
    assert "loss.type: must be one of 'mdpo', 'mdpo_discount', 'turn_dpo', 'simpo', 'mkto', 'sft', 'raft', 'grpo', 'drgrpo', 'rloo', got 'dpo'" in msg
    # An option the chosen objective would ignore is an error naming the file and the key.
    msg = error_of(write(tmp_path, "loss:\n  type: mkto\n  nll_coef: 0.5\n"))
    assert msg.startswith(str(tmp_path / "x.yaml")) and "loss.nll_coef: not used by loss.type 'mkto'" in msg
    msg = error_of(SHIPPED, ["loss.dpo_variant=ipo", "loss.label_smoothing=0.1"])
    assert "gemma7b_mdpo.yaml: loss.label_smoothing: only the sigmoid DPO loss smooths labels" in msg
    msg = error_of(write(tmp_path, "model:\n  dtype: float16\n"))
    assert "model.dtype" in msg and "'float32', 'bfloat16'" in msg


def test_name_in_yaml_overrides_stem_and_must_be_str(tmp_path):
    assert load_config(write(tmp_path, "name: other\n")).name == "other"
    assert "name: expected str, got int 3" in error_of(write(tmp_path, "name: 3\n"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "loss:\n  beta: [0.1\n  mask: model\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: line ") and "invalid YAML" in msg


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "loss:\n  beta: 0.1\n  beta: 0.2\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: line 3") and "duplicate key 'beta'" in msg


def test_non_mapping_and_missing_file(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert error_of(path) == f"{path}: expected a mapping of sections, got list ['a', 'b']"
    empty = write(tmp_path, "", "empty.yaml")
    assert error_of(empty).startswith(f"{empty}: empty config")
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"{missing}: file not found"


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- overrides
def test_overrides_float_list_null_and_name():
    cfg = load_config(SHIPPED, ["loss.beta=0.5", "data.train=[gsm8k]", "data.max_prompts=null",
                                "optimizer.lr=1e-6", "name=ablation", "loss.mask=completion"])
    assert cfg.loss.beta == 0.5
    assert cfg.data.train == ["gsm8k"]
    assert cfg.data.max_prompts is None
    assert cfg.optimizer.lr == pytest.approx(1e-6)
    assert cfg.name == "ablation"
    assert cfg.loss.mask == "completion"


def test_override_applies_after_file(tmp_path):
    path = write(tmp_path, "data:\n  max_prompts: 10\n")
    assert load_config(path, ["data.max_prompts=20"]).data.max_prompts == 20


def test_override_unknown_key_names_override():
    msg = error_of(SHIPPED, ["loss.bta=0.5"])
    assert msg == "override 'loss.bta=0.5': unknown key 'loss.bta' (did you mean 'loss.beta'?)"


def test_override_unknown_section_and_nested_key():
    assert "unknown section 'los'" in error_of(SHIPPED, ["los.beta=0.5"])
    msg = error_of(SHIPPED, ["loss.beta.x=1"])
    assert msg.startswith("override 'loss.beta.x=1': unknown key 'loss.beta.x'")
    assert "write section.key" in error_of(SHIPPED, ["loss=1"])


def test_override_missing_equals():
    msg = error_of(SHIPPED, ["loss.beta"])
    assert msg == "override 'loss.beta': expected section.key=value"


def test_override_bad_type_and_choice():
    assert "loss.beta: expected float, got str 'abc'" in error_of(SHIPPED, ["loss.beta=abc"])
    assert "must be one of" in error_of(SHIPPED, ["reference.mode=fixed"])
    assert error_of(SHIPPED, ["data.train=[a"]).startswith("override 'data.train=[a': ")


def test_apply_overrides_does_not_mutate_input():
    base = ExperimentConfig()
    new = apply_overrides(base, ["loss.beta=0.3", "data.train=[math]"])
    assert new.loss.beta == 0.3 and base.loss.beta == 0.1
    assert base.data.train == ["gsm8k", "math"]


# ---------------------------------------------------------------- save / round-trip
def test_save_load_round_trip(tmp_path):
    cfg = load_config(SHIPPED, ["loss.beta=0.25", "data.max_prompts=500", "optimizer.lr=3e-7"])
    out = tmp_path / "runs" / "exp" / "config.yaml"
    save_config(cfg, out)
    raw = yaml.safe_load(out.read_text())  # plain YAML, readable without our loader
    assert raw["loss"]["beta"] == 0.25 and raw["name"] == "gemma7b_mdpo"
    assert raw == config_to_dict(cfg)
    assert load_config(out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp files left


def test_save_overwrites_and_defaults_round_trip(tmp_path):
    out = tmp_path / "c.yaml"
    save_config(ExperimentConfig(name="a"), out)
    cfg = dataclasses.replace(ExperimentConfig(name="b"))
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_config_to_dict_order_and_types():
    d = config_to_dict(ExperimentConfig(name="n"))
    assert list(d)[:2] == ["name", "model"]
    assert d["optimizer"]["betas"] == [0.9, 0.999]
    assert d["filters"]["max_answer_chars"] == 20


def test_every_shipped_experiment_loads_and_states_its_command():
    shipped = sorted(SHIPPED.parent.glob("*.yaml"))
    assert len(shipped) >= 13
    for path in shipped:
        cfg = load_config(path)
        assert cfg.name == path.stem
        first = path.read_text().splitlines()[0]
        assert first in (f"# make train EXP={path.stem}", "# make demo        (python -m mdpo.demo: writes runs/demo; "
                                                           "kill it any time and rerun to resume)"), path
    by = {p.stem: load_config(p) for p in shipped}
    base = by["gemma7b_mdpo"]
    # The ablations change what their names say and nothing else of the recipe.
    assert by["gemma7b_mdpo_fixed_ref"].reference.mode == "sft" and base.reference.mode == "previous"
    assert by["gemma7b_dpo_nomask"].loss.mask == "completion" and base.loss.mask == "model"
    assert (by["gemma7b_mdpo_n6"].rollout.n_current, by["gemma7b_mdpo_n6"].rollout.n_previous) == (4, 2)
    assert by["gemma7b_mdpo_onpolicy"].rollout.n_previous == 0
    assert by["gemma2_9b_mdpo"].optimizer.lr == pytest.approx(2e-7)
    # The paper's Mistral recipe: lr 2e-7 (M-DPO and M-KTO), SFT lr 1e-5 with 50 warmup steps; the rest Gemma-7B's.
    for name, loss in (("mistral7b_mdpo", "mdpo"), ("mistral7b_mkto", "mkto")):
        m = config_to_dict(by[name])
        assert (by[name].optimizer.lr, by[name].loss.type, by[name].sft.lr, by[name].sft.warmup_steps) == \
            (pytest.approx(2e-7), loss, pytest.approx(1e-5), 50)
        same = {s: v for s, v in m.items() if s not in ("name", "model", "optimizer", "sft", "loss")}
        assert same == {s: v for s, v in config_to_dict(base).items() if s in same}
        assert {k: v for k, v in m["loss"].items() if k != "type"} == \
            {k: v for k, v in config_to_dict(base)["loss"].items() if k != "type"}
    assert by["gemma7b_mdpo_nll"].loss.nll_coef == 1.0 and by["gemma7b_raft"].loss.type == "raft"
    assert [by[f"gemma7b_mdpo_beta{b}"].loss.beta for b in ("0.01", "0.5")] == [0.01, 0.5]
    fixed = config_to_dict(by["gemma7b_mdpo_fixed_ref"])
    assert {s: v for s, v in fixed.items() if s not in ("name", "reference")} == \
        {s: v for s, v in config_to_dict(base).items() if s not in ("name", "reference")}


# ---------------------------------------------------------------- cross-field checks at load
CONTRADICTIONS = [  # (YAML, the keys the message must name)
    ("rollout: {compile: true, kv_attention: flex}", ["rollout.compile", "rollout.kv_attention"]),
    ("rollout: {kv_attention: flex, kv_block_size: 2048, max_length: 2048}",
     ["rollout.kv_attention", "rollout.kv_block_size", "rollout.max_length"]),
    ("rollout: {kv_attention: flex, kv_block_size: 1}", ["rollout.kv_attention", "rollout.kv_block_size"]),
    ("rollout: {kv_attention: flex, max_length: 16}",  # the flex default block (16) is the dense layout here
     ["rollout.kv_attention", "rollout.kv_block_size", "rollout.max_length"]),
    ("rollout: {kv_cache_gb: 4.0, kv_block_size: 4096, max_length: 2048}",
     ["rollout.kv_cache_gb", "rollout.kv_block_size", "rollout.max_length"]),
    ("rollout: {max_new_tokens_per_turn: 4096, max_length: 2048}",
     ["rollout.max_new_tokens_per_turn", "rollout.max_length"]),
    ("rollout: {max_length: 256}\neval: {max_new_tokens_per_turn: 300}",
     ["eval.max_new_tokens_per_turn", "rollout.max_length"]),
    ("training: {global_batch_size: 32, micro_batch_size: 3}",
     ["training.global_batch_size", "training.micro_batch_size"]),
    ("training: {micro_batch_size: 5, global_batch_size: 10}\nsft: {data: sft.jsonl, global_batch_size: 48}",
     ["sft.global_batch_size", "training.micro_batch_size"]),
    ("rollout: {first_previous: sft_1epoch, n_previous: 0}", ["rollout.first_previous", "rollout.n_previous"]),
    ("loss: {type: simpo}\nreference: {online: true}", ["reference.online", "loss.type"]),
    ("loss: {type: sft}\nreference: {mode: sft}", ["reference.mode", "loss.type"]),
    ("filters: {long_answer: false, max_answer_chars: 30}", ["filters.max_answer_chars", "filters.long_answer"]),
    ("data: {heldout: 500, max_prompts: 400}", ["data.heldout", "data.max_prompts"]),
    ("data: {heldout: 100, max_prompts: 400, prompts_per_iteration: 200}\ntraining: {iterations: 3}",
     ["data.prompts_per_iteration", "training.iterations", "data.max_prompts", "data.heldout"]),
]


@pytest.mark.parametrize("text,keys", CONTRADICTIONS, ids=[k[0] for _, k in CONTRADICTIONS])
def test_contradictions_are_refused_at_load(tmp_path, text, keys):
    path = write(tmp_path, text + "\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: "), msg
    for key in keys:
        assert key in msg, (key, msg)


def test_contradiction_made_by_an_override_names_the_file(tmp_path):
    path = write(tmp_path, "rollout: {kv_attention: flex}\n")
    assert load_config(path).rollout.kv_attention == "flex"  # flex alone is fine (block 16 < 2048)
    msg = error_of(path, ["rollout.compile=true"])
    assert msg.startswith(f"{path}: rollout.compile true and rollout.kv_attention 'flex'")


def test_consistent_neighbours_of_the_contradictions_load(tmp_path):
    ok = ["rollout: {kv_attention: flex, kv_block_size: 64, max_length: 2048}",
          "rollout: {kv_cache_gb: 4.0, kv_block_size: 16}",
          "rollout: {max_length: 64}",  # the default turn budgets (512) are not held against a short max_length
          "training: {global_batch_size: 32, micro_batch_size: 4}",
          "rollout: {first_previous: sft_1epoch, n_previous: 2}",
          "loss: {type: simpo}", "filters: {long_answer: false}",
          "data: {max_prompts: 500}",  # the default held-out size is the pipeline's to refuse, with the data
          "data: {heldout: 0.1, max_prompts: 400, prompts_per_iteration: 120}\ntraining: {iterations: 3}"]
    for text in ok:
        load_config(write(tmp_path, text + "\n"))


@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_heldout_must_be_a_fraction_or_a_count(tmp_path, value):
    assert "data.heldout must be a fraction" in error_of(write(tmp_path, f"data: {{heldout: {value}}}\n"))
