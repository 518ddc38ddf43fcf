"""Load a Python object named by a user option: ``"package.module:function"`` or ``"path/file.py:function"``.

Constraints (``--constraints``), reward functions (``--reward_function``) and judges (``--judge
function:...``) are all named this way. Errors name the option, so the user knows which one to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from preftune.errors import ConfigError


def load_callable(spec: str, option: str):
    """Resolve ``spec`` to a callable; dots after the colon reach attributes (``os:path.join``).

    ``option`` names the option being loaded in every error ("--judge", "reward_function", ...).
    Raises :class:`ConfigError` for a malformed spec, a module that cannot be imported, a missing
    attribute or a target that is not callable.
    """
    module_name, sep, attr_path = str(spec).rpartition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"{option} '{spec}' must be written 'package.module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        module = _import_file(module_name, spec, option)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"{option} '{spec}': cannot import module '{module_name}' ({err})") from None
    target = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{option} '{spec}': module '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{option} '{spec}': '{attr_path}' is a {type(target).__name__}, not a function")
    return target


def _import_file(path_text: str, spec: str, option: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option} '{spec}': file '{path}' does not exist")
    module_spec = importlib.util.spec_from_file_location(f"preftune_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{option} '{spec}': cannot load '{path}' as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as err:
        raise ConfigError(f"{option} '{spec}': importing '{path}' failed ({err})") from None
    return module
