"""Typed config loading: YAML + --set → TrainConfig, and every error names its field."""
import pytest

from curvtrain.distributed.config import TrainConfig, config_to_dict, save_config
from curvtrain.launcher.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_and_overrides(tmp_path):
    cfg = load_config(TrainConfig, write(tmp_path, "optimizer: {lr: 3e-4, betas: [0.9, 0.99]}\nengine: {zero_stage: 2}\n"),
                      ["batch.micro_batch_size=4", "data.corpus=lee", "engine.precision=bf16"])
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.engine.zero_stage == 2 and cfg.engine.precision == "bf16"
    assert cfg.batch.micro_batch_size == 4 and cfg.data.corpus == "lee"
    assert cfg.grad_accum == cfg.batch.global_batch_size // (4 * cfg.workers.num_workers)


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(TrainConfig, None, ["optimizer.lr=0.02", "model.name=20m"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(TrainConfig, tmp_path / "c.yaml") == cfg
    assert config_to_dict(cfg)["optimizer"]["betas"] == list(cfg.optimizer.betas)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lrr=1"], r"unknown config key optimizer\.lrr"),
    (["nonsense=1"], r"unknown config key nonsense"),
    (["engine.zero_stage=4"], r"engine: zero_stage must be 0, 1, 2 or 3"),
    (["engine.zero_stage=two"], r"engine\.zero_stage: expected an integer"),
    (["engine.precision=fp16"], r"precision must be 'fp32' or 'bf16'"),
    (["optimizer.lr=-1"], r"optimizer: lr must be a positive number"),
    (["optimizer.name=lamb"], r"optimizer: name must be one of"),
    (["optimizer.betas=[0.9]"], r"optimizer\.betas: expected a list of 2 values"),
    (["model.name=3b"], r"model: name must be one of"),
    (["workers.use_gpu=maybe"], r"workers\.use_gpu: expected true or false"),
    (["batch.global_batch_size=12", "batch.micro_batch_size=4"], r"global_batch_size \(12\) must be a multiple"),
    (["schedule.warmup_steps=500", "schedule.max_steps=100"], r"schedule: warmup_steps must be in"),
    (["optimizer.lowrank.update_gap=0"], r"optimizer\.lowrank: update_gap must be a positive int"),
    (["optimizer.lowrank.proj_method=qr"], r"optimizer\.lowrank: proj_method must be one of"),
    (["engine=3"], r"engine: expected a mapping"),
    (["run.eval_samples=4", "batch.micro_batch_size=4"], r"run\.eval_samples \(4\) must be ≥ batch\.micro_batch_size × workers\.num_workers \(8\)"),
    (["engine"], r"--set expects key=value"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(TrainConfig, write(tmp_path, "- a\n- b\n"))
