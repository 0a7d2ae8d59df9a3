"""OmegaConf resolvers the configs use; registered on `import domino`, so every entry point, the
compose API and the tests see them without registering anything themselves."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

_UNSET = (None, "", "None", "null")


def first_set(*values):
    """The first argument that is set (not null/empty): `${domino_first:${oc.select:output_dir,null},<default>}`."""
    return next((v for v in values if v not in _UNSET), None)


def plain(x):
    """An OmegaConf node as plain Python (resolved); anything else as it is."""
    from omegaconf import DictConfig, ListConfig
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("domino_first", first_set, replace=True)


def instantiate(node, *args, **kwargs):
    """hydra.utils.instantiate, but a bad value reaches the user as the error its constructor
    raised (ValueError naming the key), not wrapped in Hydra's InstantiationException."""
    import hydra
    from hydra.errors import InstantiationException
    try:
        return hydra.utils.instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def compose(config_name: str, overrides: list[str] | tuple = ()):
    """A stage's config as its entry point would compose it: inside a running Hydra app (the
    study) with that app's search path, else from conf_dir()."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def conf_dir() -> Path:
    """The config directory: $DOMINO_CONF, else the copy an installed wheel carries (domino/conf),
    else the repository's conf/ (a clone or an editable install)."""
    if os.environ.get("DOMINO_CONF"):
        return Path(os.environ["DOMINO_CONF"]).expanduser().resolve()
    packaged = Path(__file__).resolve().parents[1] / "conf"  # domino/conf beside domino/core
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "conf"
