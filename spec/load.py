"""Reading a spec: TOML text or a dict -> a validated Spec, or a SpecError listing every problem.

Nothing here lets an exception other than SpecError escape for bad input: a malformed file, a wrong type, an
unknown field, an unknown preset or GPU all come back as named issues with a fix.
"""
from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import SpecError, SpecIssue
from .presets import PRESETS
from .spec import ClusterSpec, ParallelSpec, Spec, TrainingSpec
from .model import ModelSpec
from .validate import check

_TABLES: dict[str, type[BaseModel]] = {"model": ModelSpec, "cluster": ClusterSpec, "training": TrainingSpec,
                                       "parallel": ParallelSpec}


def _known_fields(loc: tuple) -> list[str]:
    """Field names valid at a location, for 'did you mean' hints on unknown fields."""
    cls: Any = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        ann = getattr(cls, "model_fields", {}).get(part)
        if ann is None:
            return []
        cls = _TABLES.get(part, ann.annotation)
        if part == "custom_gpu":
            from .spec import CustomGPU
            cls = CustomGPU
    return list(getattr(cls, "model_fields", {}))


def _issue_from_pydantic(err: dict) -> SpecIssue:
    # drop union-branch tags: "literal['auto']" and the class name of the table branch of `parallel`
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p == "ParallelSpec")))
    field = ".".join(str(p) for p in loc) or "spec"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc), n=1)
        fix = f"did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?" if close else \
            f"remove it; valid fields here: {', '.join(_known_fields(loc))}"
        return SpecIssue(field, value, "unknown field.", fix)
    if kind == "missing":
        return SpecIssue(field, None, "required field is missing.", f"add {loc[-1]} = ... to the spec.")
    if kind == "literal_error":
        return SpecIssue(field, value, "not an allowed value.", err["msg"].replace("Input should be", "use"))
    if kind == "value_error":
        return SpecIssue(field, value, err["msg"].removeprefix("Value error, "), "")
    return SpecIssue(field, value, err["msg"] + ".", _TYPE_FIXES.get(kind.split("_")[0], "see the README's spec tour for this field."))


_TYPE_FIXES = {
    "int": "write a whole number without quotes, e.g. 8.",
    "float": "write a number without quotes, e.g. 2.5 or 1e12.",
    "bool": "write true or false, without quotes.",
    "string": "write a quoted string.",
    "greater": "use a positive value.",
    "less": "use a smaller value.",
    "dict": "write a table ([name] or {key = value}).",
    "model": "write a table ([name] or {key = value}).",
    "tuple": "write a list, e.g. [\"pp\", \"dp\", \"cp\", \"tp\"].",
    "list": "write a list, e.g. [1, 2].",
}


def _expand_preset(model: Any, issues: list[SpecIssue]) -> Any:
    if not isinstance(model, dict) or "preset" not in model:
        return model
    name = model["preset"]
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.3)
        issues.append(SpecIssue("model.preset", name, "unknown model preset.", f"use one of {close or list(PRESETS)}."))
        return None
    overrides = {k: v for k, v in model.items() if k != "preset"}
    return {"name": name, **PRESETS[name], **overrides}


def spec_from_dict(data: dict) -> Spec:
    """Build and validate a Spec from plain data (a parsed TOML file, or a dict made in code)."""
    issues: list[SpecIssue] = []
    if not isinstance(data, dict):
        raise SpecError([SpecIssue("spec", type(data).__name__, "a spec is a table of tables.",
                                   "write [model], [cluster], [training] and [parallel] tables.")])
    data = dict(data)
    if "model" in data:
        data["model"] = _expand_preset(data["model"], issues)
        if data["model"] is None:
            raise SpecError(issues)
    if isinstance(data.get("parallel"), str) and data["parallel"] != "auto":
        issues.append(SpecIssue("parallel", data["parallel"], "parallel is either a table or the string \"auto\".",
                                "write parallel = \"auto\" or a [parallel] table."))
        raise SpecError(issues)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        if isinstance(data.get("parallel"), dict):      # a table was meant: the "auto" branch's error is noise
            errors = [e for e in errors if not (e["loc"][:1] == ("parallel",) and len(e["loc"]) == 2
                                                and "[" in str(e["loc"][1]))]
        raise SpecError(issues + [_issue_from_pydantic(e) for e in errors]) from None
    issues += check(spec)
    if issues:
        raise SpecError(issues)
    return spec


def parse_spec(text: str, source: str = "<text>") -> Spec:
    """`source` names the input in errors (the file's path when called from load_spec)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([SpecIssue("file", source, f"not valid TOML: {exc}.",
                                   "fix the syntax at that line (tables in [brackets], key = value).")]) from None
    return spec_from_dict(data)


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError([SpecIssue("file", str(p), f"cannot be read ({exc.strerror}).",
                                   "check the path.")]) from None
    except UnicodeDecodeError:
        raise SpecError([SpecIssue("file", str(p), "is not UTF-8 text.", "give a TOML spec file.")]) from None
    return parse_spec(text, str(p))
