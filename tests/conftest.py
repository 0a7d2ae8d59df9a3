"""Shared fixtures: Hydra composition against the real conf/, a tiny random backbone, small sizes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = {"name": "tiny", "path": "tiny", "dtype": "float32",
        "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "seed": 0}}
# sizes that keep a tiny training step well under a second on 2 CPU cores
SMALL_TRAIN = ["backbone=tiny", "domain.n_references=8", "data.max_len=48", "data.val_size=4",
               "data.batch_size=4", "prompt.k=4", "prompt.l=4", "trainer.max_steps=2",
               "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_thread():
    """torch on one thread for the test (2 shared cores: oversubscribed OpenMP threads make tiny
    models 10x slower), restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_backbone():
    from domino.core.backbone import load_backbone
    return load_backbone(**TINY)


@pytest.fixture(autouse=True)
def _tiny_backbone_back_on_cpu(request):
    """On a CUDA machine the model stages (device=auto) move the backbone they are given to the GPU;
    the session's tiny backbone goes back to the CPU after each test, where the other tests expect it."""
    yield
    if torch.cuda.is_available() and "tiny_backbone" in request.fixturenames:
        request.getfixturevalue("tiny_backbone").model.to("cpu")


def compose_config(name: str, overrides=(), output_dir: str | os.PathLike | None = None):
    """The config `name` as its entry point would compose it, outside a Hydra app (module scope
    fixtures use this; tests the `compose` fixture)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else ["paths.output_dir=/tmp/x"]
    extra += [f"paths.root_dir={ROOT}"]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=name, overrides=list(overrides) + extra)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture()
def compose():
    """compose(config_name, overrides, output_dir) -> DictConfig, as the entry point would see it."""
    yield compose_config


class StopAt(Callback):
    """A Lightning callback that ends a run after `step` optimizer steps, as a crash (or a
    pre-emption) right after that step's checkpoint would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True
