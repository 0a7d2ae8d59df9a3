"""The installable package: a wheel with its configs, the `domino` command from outside the clone,
the Python API, and outputs that load where people expect them (peft)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, SMALL_TRAIN, TINY

FAST = SMALL_TRAIN + ["trainer.max_steps=2"]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """train() through the Python API, no Hydra app, from another working directory."""
    from domino.api import train
    out = tmp_path_factory.mktemp("api")
    cwd = os.getcwd()
    os.chdir(out)
    try:
        return out, train(FAST)
    finally:
        os.chdir(cwd)


def test_python_api_runs_without_a_hydra_app(api_run):
    out, result = api_run
    run = Path(result["output_dir"])
    # the default run dir is under the working directory, as with `python train.py`
    assert run.parent == out / "lightning_logs" / "train" / "runs"
    assert set(result) == {"output_dir", "artifacts", "metrics"}  # the stage table's one shape
    assert Path(result["artifacts"]["domain_prompt"]).exists() and "train/loss" in result["metrics"]
    assert Path(result["artifacts"]["lineage"]).exists()


def test_api_takes_a_config_or_overrides_not_both(api_run, tmp_path):
    from domino.api import compose, synthesize
    cfg = compose("synthesize", [f"ckpt={api_run[1]['artifacts']['domain_prompt']}", "n=2", "engine.batch_size=2",
                                 "sampling.max_new_tokens=4", "progress=false"], output_dir=tmp_path / "s")
    assert cfg.paths.output_dir == str(tmp_path / "s")
    res = synthesize(config=cfg)
    assert res["metrics"]["n_present"] == 2 and Path(res["artifacts"]["samples"]).parent == tmp_path / "s"
    with pytest.raises(ValueError, match="not both"):
        synthesize(["n=2"], config=cfg)
    from domino.api import curate
    cur = curate([f"samples={res['artifacts']['samples']}", "curation.judge.enabled=false",
                  "curation.responses.enabled=false", "progress=false"], output_dir=tmp_path / "c")
    assert Path(cur["artifacts"]["curated"]).parent == tmp_path / "c" and "sft" not in cur["artifacts"]
    with pytest.raises(ValueError, match="unknown stage"):
        compose("nope")


def test_peft_prompt_adapter_loads_and_generates(api_run):
    """<run>/peft_prompt is D as a PromptTuning adapter: peft prepends exactly D to the input."""
    from peft import PeftModel
    from safetensors import safe_open

    from domino.core.backbone import load_backbone
    from domino.core.domain_prompt import load_domain_prompt
    run = Path(api_run[1]["output_dir"])
    adapter = run / "peft_prompt"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PROMPT_TUNING" and conf["num_virtual_tokens"] == 4 and conf["token_dim"] == 64
    D = load_domain_prompt(run).tokens
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        header = f.metadata()
        assert torch.equal(f.get_tensor("prompt_embeddings"), D)
    meta = json.loads((run / "domain_prompt.json").read_text())
    assert header["digest"] == meta["digest"] and header["reference_fingerprint"] == meta["reference_fingerprint"]
    assert header["backbone_hash"] == meta["backbone_hash"]

    bb = load_backbone(**TINY)
    ids = bb.tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = bb.model(inputs_embeds=torch.cat([D[None], bb.embed(ids)], 1)).logits[:, D.shape[0]:]
    model = PeftModel.from_pretrained(bb.model, str(adapter)).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits[:, D.shape[0]:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_peft_adapter_names_the_embedded_model_by_hub_id(tmp_path):
    from domino.core.backbone import EMBEDDED_ID, hub_id
    from domino.core.domain_prompt import save_peft_prompt
    d = save_peft_prompt(tmp_path, torch.zeros(2, 8), {"backbone": {"path": "embedded", "cache_dir": "/x"}})
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_ID
    assert EMBEDDED_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id({"path": "Qwen/Qwen2.5-Coder-7B-Instruct"}) == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert hub_id({"path": "tiny"}) is None


def test_cli_help_shows_only_the_stages_own_groups():
    from domino.cli import main, stage_help
    text = stage_help("train")
    assert "objective" in text and "logger" in text and "callbacks" in text
    assert "method " not in text and "engine" not in text and "lora" not in text and "benchmark" not in text
    assert "demo_synthesize" not in text and "paper_codegen" in text
    text = stage_help("evaluate")
    assert "benchmark" in text and "objective" not in text
    assert main(["nope"]) == 2


@pytest.mark.slow
def test_wheel_installs_and_the_cli_runs_outside_the_clone(tmp_path):
    """pip wheel . (not editable), install it into a fresh venv, run `domino train` from a
    directory outside the clone. The venv borrows this environment's third-party packages through
    a .pth file (no network, no rebuilds); `domino` itself comes only from the wheel."""
    import shutil
    src = tmp_path / "src"  # a copy of the clone's files: the build leaves nothing in the clone
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file() and not rel.startswith(("results/", "tests/", "bench/")):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("domino_synthesis-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "domino/conf/train.yaml" in names and "domino/conf/objective/domino.yaml" in names
    assert any(n.endswith("LICENSE") for n in names) and "domino/cli.py" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    (site / "_borrowed_deps.pth").write_text(str(ours) + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DOMINO_ROOT", "DOMINO_CONF")}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([str(vpy), "-c", "import domino, domino.core.config as c; print(domino.__file__); "
                            "print(c.conf_dir())"], cwd=work, capture_output=True, text=True, env=env)
    mod_file, conf = where.stdout.split()
    assert mod_file.startswith(str(site)) and conf.startswith(str(site)), where.stdout + where.stderr
    proc = subprocess.run([str(venv / "bin" / "domino"), "train", *FAST, "trainer.enable_progress_bar=false"],
                          cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (work / "lightning_logs" / "train" / "runs").iterdir()
    assert (run / "domain_prompt.safetensors").exists() and (run / "peft_prompt" / "adapter_config.json").exists()
    help_ = subprocess.run([str(venv / "bin" / "domino"), "finetune", "--help"], cwd=work, capture_output=True,
                           text=True, env=env, timeout=120)
    assert help_.returncode == 0 and "lora" in help_.stdout


@pytest.mark.slow
def test_lora_adapter_names_its_base_model_by_hub_id(tmp_path):
    """The embedded model's adapter says HuggingFaceTB/SmolLM2-135M-Instruct (what another machine
    or the hub knows), not this machine's cache directory, which is recorded separately."""
    from peft import PeftModel

    from domino.core.backbone import EMBEDDED_ID, embedded_model_dir, load_backbone
    from domino.finetune.module import LoRAModule
    m = LoRAModule(backbone={"path": "embedded"}, r=2, alpha=4, dropout=0.0)
    out = m.export_adapter(tmp_path / "adapter")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == EMBEDDED_ID
    assert m.base_local == str(embedded_model_dir())
    # it still loads onto the local copy of that base (no hub needed)
    peft = PeftModel.from_pretrained(load_backbone(path="embedded").model, str(out))
    assert peft.peft_config["default"].r == 2


@pytest.mark.slow
def test_cli_runs_ddp_ranks_and_syncs_the_validation_mean(tmp_path):
    """`domino train trainer=ddp` with 2 CPU ranks: Lightning starts rank 1 again through
    `python -m domino.cli` (the stage travels in the environment), only rank 0 takes the output
    lock, and val/nll_dom (a torchmetrics mean) is token-weighted over both ranks' halves of the
    held-out texts: with frozen prompts (lr 0) it equals the single-process value."""
    import csv

    domino_cmd = Path(sys.executable).with_name("domino")
    if not domino_cmd.exists():
        pytest.skip("the `domino` console script is not installed in this environment")
    common = ["backbone=tiny", "domain.n_references=8", "data.max_len=32", "data.val_size=4", "data.batch_size=2",
              "prompt.k=4", "prompt.l=4", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
              "optim.lr_domain=0", "optim.lr_sample=0", "checkpoint_every_n_steps=0"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "NODE_RANK")},
           "OMP_NUM_THREADS": "1"}

    def val(name, *extra):
        run = tmp_path / name
        proc = subprocess.run([str(domino_cmd), "train", *common, *extra, f"hydra.run.dir={run}"], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(run / "csv" / "metrics.csv") as fh:
            return [float(r["val/nll_dom"]) for r in csv.DictReader(fh) if r.get("val/nll_dom")]

    ddp = val("ddp", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
    single = val("single", "data.batch_size=4")  # two steps an epoch, as each DDP rank has
    assert ddp and single and ddp[-1] == pytest.approx(single[-1], rel=1e-5)
