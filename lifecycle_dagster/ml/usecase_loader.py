"""Reading a use case from YAML: a profile's base use case, files layered over it, overrides last.

A profile is a named preset that points at a use case and overrides some of its values (the ``tiny``
profile shrinks everything so the whole lifecycle runs in minutes on two CPU cores). Every error names
the file, the line and the field (the layer that set the field last).
"""

from __future__ import annotations

import copy
import os
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lifecycle_dagster import settings
from lifecycle_dagster.ml import tasks
from lifecycle_dagster.ml.errors import InputError, collect
from lifecycle_dagster.ml.usecase import PROFILES_DIR, USECASES_DIR, UseCase


def parse_overrides(text: str | None, source: str = "--override") -> dict | None:
    """A YAML/JSON mapping given on a command line or in run config (None when empty)."""
    if text is None or not text.strip():
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(source, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InputError(source, "expected a YAML mapping, e.g. '{adaptation: {max_steps: 10}}'")
    return data


def read_text(path: Path) -> str:
    """Read a UTF-8 text file; non-UTF-8 bytes and empty files are input errors with a line."""
    if not path.exists():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 (byte 0x{raw[exc.start]:02x})", line=line) from None
    if not text.strip():
        raise InputError(path, "file is empty")
    return text


def _line_index(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    out = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            out[path] = key.start_mark.line + 1
            for sub, line in _line_index(value, path).items():
                out.setdefault(sub, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_line_index(item, (*prefix, i)))
    return out


def _load_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(
            path,
            f"invalid YAML: {getattr(exc, 'problem', exc)}",
            line=mark.line + 1 if mark else None,
        ) from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping at the top level", line=1)
    return data, _line_index(node) if node is not None else {}


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _validate(raw: dict, sources: list[tuple[Path, dict[tuple, int], dict]]) -> UseCase:
    try:
        return UseCase.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith("function-after"))
            # The error belongs to the last file that set this field (an override wins).
            path, lines = sources[0][0], sources[0][1]
            for src_path, src_lines, src_raw in sources:
                if _has_path(src_raw, loc):
                    path, lines = src_path, src_lines
            field = ".".join(str(p) for p in loc) or None
            errors.append(InputError(path, err["msg"], line=_nearest_line(lines, loc), field=field))
        collect(errors)
        raise  # pragma: no cover (a ValidationError has errors)


def _has_path(raw: Any, loc: tuple) -> bool:
    node = raw
    for part in loc[:-1] if loc else ():
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            node = node[part]
        else:
            return False
    return not loc or (isinstance(node, dict) and loc[-1] in node) or isinstance(node, list)


def _expand(value: str) -> str:
    """``${LIFECYCLE_HOME}`` (the state dir, also when unset) and other env vars, then ``~``."""
    env = {**os.environ, "LIFECYCLE_HOME": str(settings.state_home())}
    return os.path.expanduser(string.Template(value).safe_substitute(env))


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    raw = copy.deepcopy(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval", "preferences_train", "preferences_eval"):
            if isinstance(data.get(key), str):
                data[key] = str((base_dir / _expand(data[key])).resolve())
    retrieval = raw.get("retrieval")
    if isinstance(retrieval, dict):
        if isinstance(retrieval.get("documents"), str):
            retrieval["documents"] = str((base_dir / _expand(retrieval["documents"])).resolve())
        model = retrieval.get("embedding_model")
        if isinstance(model, str) and not model.startswith("package:"):
            retrieval["embedding_model"] = str((base_dir / _expand(model)).resolve())
    for section in ("base_model", "reward"):
        spec = raw.get(section)
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            spec["path"] = _expand(spec["path"])
            candidate = base_dir / spec["path"]
            if spec.get("source") in ("local", "gguf", "existing") or candidate.exists():
                spec["path"] = str(candidate.resolve())
    return raw


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    candidate = PROFILES_DIR / f"{profile}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise InputError(candidate, f"unknown profile '{profile}' (known: {known})")
    return candidate


def packaged_use_case(name: str) -> Path:
    """A use case by name (a folder of the package's ``usecases/``) or by YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path.resolve()
    candidate = USECASES_DIR / name / "usecase.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.parent.name for p in USECASES_DIR.glob("*/usecase.yaml")))
        raise InputError(candidate, f"unknown use case '{name}' (packaged: {known})")
    return candidate


def load_use_case(
    use_case_file: str | Path | None = None,
    *,
    profile: str | None = None,
    use_case: str | None = None,
    overrides: dict | None = None,
) -> UseCase:
    """Resolve a use case: a base use case (``use_case``, a packaged name or a YAML file; else the
    profile's), the profile's overrides, the given file over them, then overrides.

    ``use_case_file`` may be a complete use case or a partial one layered over the base.
    """
    layers: list[tuple[Path, dict[tuple, int], dict]] = []
    if use_case_file is not None and profile and not use_case and _complete(Path(use_case_file)):
        # A complete use case (``lifecycle init`` writes one) takes the place of the profile's.
        use_case, use_case_file = str(Path(use_case_file).resolve()), None
    if use_case and not profile:
        base_path = packaged_use_case(use_case)
        bdata, blines = _load_yaml(base_path)
        layers.append((base_path, blines, _resolve_paths(bdata, base_path.parent)))
    if profile:
        ppath = profile_path(profile)
        pdata, plines = _load_yaml(ppath)
        base_ref = pdata.get("use_case")
        if not isinstance(base_ref, str):
            raise InputError(ppath, "a profile names its use case", line=1, field="use_case")
        base_path = packaged_use_case(use_case) if use_case else (ppath.parent / base_ref).resolve()
        bdata, blines = _load_yaml(base_path)
        layers.append((base_path, blines, _resolve_paths(bdata, base_path.parent)))
        over = pdata.get("overrides") or {}
        if not isinstance(over, dict):
            raise InputError(
                ppath, "expected a mapping", line=plines.get(("overrides",)), field="overrides"
            )
        over_lines = {k[1:]: v for k, v in plines.items() if k[:1] == ("overrides",)}
        layers.append((ppath, over_lines, _resolve_paths(over, ppath.parent)))
    if use_case_file is not None:
        upath = Path(use_case_file).resolve()
        udata, ulines = _load_yaml(upath)
        layers.append((upath, ulines, _resolve_paths(udata, upath.parent)))
    if not layers:
        raise ValueError("load_use_case needs a use-case file or a profile")
    if overrides:
        layers.append((Path("<run config overrides>"), {}, _resolve_paths(overrides, Path.cwd())))
    merged: dict = {}
    for _, _, data in layers:
        merged = _deep_merge(merged, data)
    # `thresholds.primary` names the primary metric in the layer that says it, so a later layer's
    # own threshold for that metric still wins (and a later `primary` wins over an earlier metric).
    primary = _primary_metric_of(merged)
    if primary:
        layers = [(p, lines, _primary_named(data, primary)) for p, lines, data in layers]
        merged = {}
        for _, _, data in layers:
            merged = _deep_merge(merged, data)
    use_case = _validate(merged, layers)
    _check_sources_exist(use_case, layers)
    return use_case


def _complete(path: Path) -> bool:
    """Whether a use-case file stands alone (it has a name, a task and data), rather than being
    a partial layer over a base use case."""
    data, _ = _load_yaml(path)
    return {"name", "task", "data"} <= set(data)


def _primary_metric_of(data: dict) -> str | None:
    """The primary metric a merged, unvalidated use case names; None where it cannot tell (an
    unknown kind, which validation then names)."""
    try:
        evaluation = data.get("evaluation") or {}
        kind = tasks.get((data.get("task") or {}).get("type", "summarisation"))
        return evaluation.get("primary_metric") or kind.primary
    except (AttributeError, ValueError):
        return None


def _primary_named(data: dict, metric: str) -> dict:
    """A layer with ``evaluation.thresholds.primary`` renamed to ``metric``."""
    thresholds = (data.get("evaluation") or {}).get("thresholds")
    if not isinstance(thresholds, dict) or "primary" not in thresholds:
        return data
    renamed = {(metric if k == "primary" else k): v for k, v in thresholds.items()}
    return {**data, "evaluation": {**data["evaluation"], "thresholds": renamed}}


def _check_sources_exist(uc: UseCase, layers: list[tuple[Path, dict[tuple, int], dict]]) -> None:
    errors: list[InputError] = []

    def fail(loc: tuple, message: str) -> None:
        path, lines = layers[0][0], layers[0][1]
        for src_path, src_lines, src_raw in layers:
            if _has_path(src_raw, loc):
                path, lines = src_path, src_lines
        errors.append(
            InputError(path, message, line=_nearest_line(lines, loc), field=".".join(loc))
        )

    for key, path in uc.data.files().items():
        if not path.exists():
            fail(("data", key), f"data file not found: {path}")
    bm = uc.base_model
    if bm.source == "local":
        fault = model_dir_fault(Path(bm.path))
        if fault:
            fail(("base_model", "path"), fault)
    if bm.source == "gguf":
        if not Path(bm.path).is_file():
            hint = " (`make models` fetches the demo model)" if "SmolLM2" in bm.path else ""
            fail(("base_model", "path"), f"GGUF file not found: {bm.path}{hint}")
        else:
            with Path(bm.path).open("rb") as f:
                if f.read(4) != b"GGUF":
                    fail(("base_model", "path"), f"{bm.path} is not a GGUF file (no GGUF magic)")
    if uc.reward.path:
        fault = model_dir_fault(Path(uc.reward.path), "reward model")
        if fault:
            fail(("reward", "path"), fault)
    collect(errors)


def model_dir_fault(path: Path, what: str = "model") -> str | None:
    """Why a local model directory cannot be loaded safely, or None: no ``config.json``, weights
    only as pickled ``.bin`` files (never loaded: safetensors only), no weights, no tokenizer."""
    if not (path / "config.json").exists():
        return f"no HF {what} directory (config.json) at {path}"
    if not list(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            return (
                f"{path} has weights only as pickled {', '.join(pickled[:2])}; only safetensors "
                "are loaded (convert with save_pretrained(safe_serialization=True))"
            )
        return f"no safetensors weights in {path}"
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / name).exists() for name in tokenizer_files):
        return f"no tokenizer in {path} (tokenizer.json or tokenizer.model)"
    return None
