"""Models: resolve a ``--model`` spec, convert GGUF checkpoints once into a verified cache, and load.

* ``resolve``: what a spec names (embedded aliases, folders, ``.gguf`` files), device and dtype;
* ``convert``: GGUF sources dequantized once into ``<cache>/models/``, checked by manifest on each use;
* ``load``: model folders checked and loaded for inference, and the listing for ``longdoc models``.

Cache locations, atomic writes, manifests and locks belong to ``longdoc.store``; the names re-exported
here keep ``models.cache_dir()``, ``models.MANIFEST_NAME`` and the like working for callers. Tests that
monkeypatch a function must patch it in the submodule that looks it up (e.g. ``convert._convert_gguf``,
``resolve.cpu_flags``), not here.
"""

from longdoc.cpu import parse_cpu_flags
from longdoc.models.choose import AUTO_MODEL, ModelChoice, choose_model
from longdoc.models.convert import (
    CONVERTED_DTYPE,
    SUPPORTED_GGUF_ARCHS,
    Progress,
    check_conversion,
    converted_path,
    ensure_converted,
    gguf_architecture,
)
from longdoc.models.load import LoadedModel, check_model_folder, list_models, load_model
from longdoc.models.resolve import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    MODEL_SPEC_HELP,
    KnownModel,
    ModelSource,
    cpu_flags,
    cpu_has_fast_bf16,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from longdoc.store import (
    LOCK_TIMEOUT_S,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    cache_dir,
    lock_timeout,
    models_dir,
    read_manifest,
    sha256_file,
    write_manifest,
)

__all__ = [
    "AUTO_MODEL",
    "CONVERTED_DTYPE",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ModelChoice",
    "choose_model",
    "LOCK_TIMEOUT_S",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MODEL_SPEC_HELP",
    "SUPPORTED_GGUF_ARCHS",
    "KnownModel",
    "LoadedModel",
    "ModelSource",
    "Progress",
    "cache_dir",
    "check_conversion",
    "check_model_folder",
    "converted_path",
    "cpu_flags",
    "cpu_has_fast_bf16",
    "ensure_converted",
    "gguf_architecture",
    "list_models",
    "load_model",
    "lock_timeout",
    "models_dir",
    "parse_cpu_flags",
    "read_manifest",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "sha256_file",
    "write_manifest",
]
