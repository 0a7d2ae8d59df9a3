"""`domino <stage> [key=value ...]`: every stage from anywhere, with the configs the package ships.

    domino train domain=humaneval backbone=smollm2
    domino synthesize ckpt=<run>/domain_prompt.safetensors n=1000 [curate=true]
    domino curate samples=<run>/samples.jsonl
    domino data_quality references=<run>/references.jsonl samples='{domino: <run>/samples.jsonl}'
    domino finetune data=<run>/sft.jsonl
    domino evaluate adapter=<run>/adapter benchmark=humaneval_heldout
    domino study experiment=study_humaneval
    domino train --help            # that stage's own groups and options

Overrides and Hydra flags (-m, --cfg job, hydra.run.dir=...) are those of `python train.py` etc.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from domino.stages import STAGES


def run_stage(stage: str, cfg) -> Any:
    """What the entry point of `stage` runs with its composed config (train.py etc. call this too):
    one attempt (domino.core.attempt): its record lands in the output directory only once the stage
    accepts the run, and a failure ends in one line (HYDRA_FULL_ERROR=1: the traceback). Returns the
    stage's result, or the metric a sweeper minimises (`optimized_metric`) when the config names one."""
    from domino.core import attempt
    result = attempt.run(stage, cfg, STAGES[stage].run)
    metric = cfg.get("optimized_metric")  # what a sweeper (Optuna) minimises
    return result["metrics"].get(metric) if metric and isinstance(result, dict) else result


def experiment_stage(name: str) -> str:
    """Which stage's config an experiment file is for: demo_synthesize -> synthesize, study_* ->
    study, plain names (demo, paper_codegen) -> train."""
    for stage in STAGES:
        if stage != "train" and name.endswith("_" + stage):
            return stage
    return "study" if name.startswith("study_") else "train"


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: domino <stage> [key=value ...] [--help]", "", "stages:"]
    lines += [f"  {s:<{width}}  {st.help}" for s, st in STAGES.items()]
    lines += ["", "`domino <stage> --help` lists that stage's config groups and options."]
    return "\n".join(lines)


def stage_help(stage: str) -> str:
    """The stage's own config groups (from its defaults list) with their options, then its config."""
    from omegaconf import OmegaConf

    from domino.core.config import conf_dir
    conf = conf_dir()
    name, what = STAGES[stage].config, STAGES[stage].help
    primary = OmegaConf.load(conf / f"{name}.yaml")
    lines = [f"usage: domino {stage} [key=value ...]", "", f"{stage}: {what}", "",
             "config groups (group=option):"]
    for entry in primary.get("defaults", []):
        if not isinstance(entry, (dict,)) and not OmegaConf.is_dict(entry):
            continue
        for group, default in entry.items():
            group = str(group)
            if group in ("hydra", "_self_") or group.startswith("override"):
                continue
            options = sorted(p.stem for p in (conf / group).glob("*.yaml")) if (conf / group).is_dir() else []
            if group == "experiment":
                options = [o for o in options if experiment_stage(o) == name]
            lines.append(f"  {group:<15} default: {default}   options: {', '.join(options) or '-'}")
    body = {k: v for k, v in OmegaConf.to_container(primary, resolve=False).items() if k != "defaults"}
    lines += ["", "options (defaults of this stage; groups above add their own):",
              OmegaConf.to_yaml(OmegaConf.create(body)).rstrip(), "",
              f"configs: {conf}", "Hydra flags work too: -m (multirun), --cfg job (print the composed config)."]
    return "\n".join(lines)


STAGE_ENV = "DOMINO_CLI_STAGE"  # the stage of a run, for the ranks a DDP launcher starts again


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    relaunched = os.environ.get(STAGE_ENV)
    if relaunched in STAGES and (not argv or argv[0] not in STAGES):
        # a rank Lightning started again as `python -m domino.cli <overrides>` (see below)
        argv = [relaunched, *argv]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"domino: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(stage_help(stage))
        return 0
    import hydra

    import domino  # noqa: F401  (registers the config resolvers)
    from domino.core.config import conf_dir
    sys.argv = [f"domino-{stage}", *rest]  # Hydra reads the overrides from sys.argv[1:]
    # DDP/DeepSpeed start the other ranks by re-running the main module with sys.argv[1:]; make that
    # `python -m domino.cli <overrides>` and tell it the stage (the console script `domino` itself
    # is not a module, and its argv[0] is not a file Python could run with these arguments)
    os.environ[STAGE_ENV] = stage
    main_module = sys.modules.get("__main__")
    if main_module is not None and getattr(main_module, "__spec__", None) is None:
        import importlib.util
        main_module.__spec__ = importlib.util.find_spec("domino.cli")

    def task(cfg) -> Any:
        return run_stage(stage, cfg)

    task.__module__ = __name__
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=STAGES[stage].config)(task)
    app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
