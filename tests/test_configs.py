"""Every config composes with every backbone, domain, objective and trainer; bad keys are named."""
import itertools
import subprocess
import sys

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from .conftest import CONF, ROOT

BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
DOMAINS = sorted(p.stem for p in (CONF / "domain").glob("*.yaml"))
OBJECTIVES = sorted(p.stem for p in (CONF / "objective").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))


def test_groups_exist():
    assert OBJECTIVES == ["domino", "soft_prompt"]
    assert {"smollm2", "qwen", "tiny"} <= set(BACKBONES)
    assert {"humaneval", "codecontests", "livecodebench", "jsonl"} <= set(DOMAINS)
    assert {"cpu", "gpu", "ddp", "deepspeed"} <= set(TRAINERS)


@pytest.mark.parametrize("backbone,domain", list(itertools.product(BACKBONES, DOMAINS)))
def test_train_composes(compose, backbone, domain):
    for objective, trainer in itertools.product(OBJECTIVES, TRAINERS):
        cfg = compose("train", [f"backbone={backbone}", f"domain={domain}", f"objective={objective}",
                                f"trainer={trainer}"])
        c = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert c["objective"]["name"] == objective and c["trainer"]["_target_"] == "lightning.pytorch.Trainer"
        assert c["module"]["objective"] == c["objective"] and c["module"]["_target_"].endswith("DominoModule")
        assert c["backbone"]["name"] == backbone and c["domain"]["name"] == domain


def test_cpu_trainer_instantiates(compose, tmp_path):
    cfg = compose("train", ["trainer=cpu"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps and str(tmp_path) in trainer.default_root_dir


def test_train_has_no_sampling_baselines(compose):
    """conf/method holds synthesis baselines only: a baseline is not something train.py can fit."""
    for bad in ("method=few_shot", "method=domino"):
        with pytest.raises(ConfigCompositionException, match="method"):
            compose("train", [bad])
    assert sorted(p.stem for p in (CONF / "method").glob("*.yaml")) == [
        "domain_prompt", "few_shot", "magpie", "zero_shot"]


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_logger_and_callbacks_are_one_override(compose, tmp_path, stage):
    from domino.core.trainer import build_trainer
    extra = ["data=x.jsonl"] if stage == "finetune" else []
    t = build_trainer(compose(stage, extra, tmp_path))
    assert sorted(type(lg).__name__ for lg in t.loggers) == ["CSVLogger", "TensorBoardLogger"]
    assert {"ModelCheckpoint", "LearningRateMonitor"} <= {type(c).__name__ for c in t.callbacks}
    t = build_trainer(compose(stage, extra + ["logger=csv", "callbacks=none"], tmp_path))
    assert [type(lg).__name__ for lg in t.loggers] == ["CSVLogger"]
    assert not {"ModelCheckpoint", "LearningRateMonitor"} & {type(c).__name__ for c in t.callbacks}
    assert str(tmp_path) in t.loggers[0].log_dir
    t = build_trainer(compose(stage, extra + ["logger=none"], tmp_path))
    assert t.loggers == []
    cfg = compose(stage, extra + ["logger=wandb"], tmp_path)
    assert cfg.logger.wandb._target_ == "lightning.pytorch.loggers.WandbLogger"


def test_unknown_key_is_named(compose):
    with pytest.raises(ConfigCompositionException, match="prompt.kk"):
        compose("train", ["prompt.kk=3"])
    with pytest.raises(ConfigCompositionException, match="backbone"):
        compose("train", ["backbone=nonexistent"])


def test_paper_scale_gpu_config_composes_from_cli():
    out = subprocess.run([sys.executable, "train.py", "domain=codecontests", "backbone=qwen", "trainer=deepspeed",
                          "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.backbone.path == "Qwen/Qwen2.5-Coder-7B-Instruct" and cfg.trainer.strategy.stage == 2
    assert cfg.domain.text_field == "description"


EXPERIMENTS = sorted((CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_files_start_with_their_command_and_compose(compose, path):
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_"
    cmd = lines[1].lstrip("# ").split()
    assert cmd[0] == "python" and cmd[1].endswith(".py") and f"experiment={path.stem}" in cmd, lines[1]
    entry = cmd[1][: -len(".py")]
    cfg = compose(entry, [f"experiment={path.stem}"])
    OmegaConf.to_container(cfg, resolve=True)


def test_paper_codegen_matches_the_published_setup(compose):
    cfg = compose("train", ["experiment=paper_codegen"])
    assert (cfg.prompt.k, cfg.prompt.l, cfg.optim.lr_domain, cfg.optim.warmup_steps) == (256, 256, 1e-3, 0)
    assert (cfg.data.batch_size, cfg.data.max_len, cfg.trainer.max_epochs) == (3, 1024, 10)
    assert cfg.backbone.dtype == "bfloat16" and cfg.backbone.gradient_checkpointing
    assert cfg.trainer.strategy.stage == 2 and cfg.trainer.strategy.exclude_frozen_parameters


def test_optuna_search_config_composes(compose):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e '.[optuna]'")
    compose("train", ["hparams_search=optuna"])


def test_code_defaults_equal_the_yaml(compose):
    """Every default lives in the YAML; where code keeps one (a bare DominoModule, LoRAModule,
    SamplingParams) it is the same value."""
    import dataclasses
    import inspect

    from domino.core.generation.params import SamplingParams
    from domino.finetune.module import LoRAModule
    from domino.training import module as M
    train = OmegaConf.to_container(compose("train", ["backbone=tiny"]))
    assert M.OPTIM == train["optim"]
    assert M.PROMPT == train["prompt"]
    assert M.OBJECTIVE == train["objective"]
    ft = OmegaConf.to_container(compose("finetune", ["backbone=tiny"]))
    sig = {k: v.default for k, v in inspect.signature(LoRAModule.__init__).parameters.items()
           if v.default is not inspect.Parameter.empty}
    yaml = {**{k: v for k, v in ft["lora"].items()}, "lr": ft["optim"]["lr"],
            "weight_decay": ft["optim"]["weight_decay"], "betas": ft["optim"]["betas"],
            "warmup_steps": ft["optim"]["warmup_steps"], "seed": ft["seed"], "forward_cost": ft["sft"]["forward_cost"]}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in sig.items()} == yaml
    sampling = OmegaConf.to_container(compose("synthesize", ["backbone=tiny", "sampling=default"]))["sampling"]
    code = {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.name in sampling}
    assert code == {k: (tuple(v) if isinstance(v, list) else v) for k, v in sampling.items() if k in code}
    assert SamplingParams.from_config({}) == SamplingParams()
    # the sandbox (evaluation's and curation's code checks) and the engines' batch sizes
    from domino.core.generation.hf import HFEngine
    from domino.core.sandbox import SandboxConfig
    ev = OmegaConf.to_container(compose("evaluate", ["backbone=tiny"]))
    cur = OmegaConf.to_container(compose("curate", ["backbone=tiny"]))["curation"]
    box = {f.name: f.default for f in dataclasses.fields(SandboxConfig)}
    for block in (ev["sandbox"], cur["code_checks"]["sandbox"]):
        assert {k: box[k] for k in block} == block
    hf = OmegaConf.to_container(compose("synthesize", ["backbone=tiny", "engine=hf"]))["engine"]
    engine_batch = inspect.signature(HFEngine.__init__).parameters["batch_size"].default
    assert engine_batch == hf["batch_size"] == ev["engine"]["batch_size"]
    from domino.core.generation import chat
    for gen in (cur["judge"]["generation"], cur["responses"]["generation"], cur["code_checks"]["tests_generation"]):
        assert (gen["batch_size"], gen["seed"]) == (chat.HF_BATCH, chat.SEED)
