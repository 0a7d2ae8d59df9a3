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


def conf_dir() -> Path:
    """The config directory: $DOMINO_CONF, else the copy an installed wheel carries (domino/conf),
    else the repository's conf/ (a clone or an editable install)."""
    if os.environ.get("DOMINO_CONF"):
        return Path(os.environ["DOMINO_CONF"]).expanduser().resolve()
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"
