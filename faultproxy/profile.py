"""Profile format v1: the model, the loader, and errors a user can act on.

A profile is a YAML file (see README for the format). Loading goes YAML -> plain data with the
position of every value (yamlsource) -> pydantic models (one per block; fault configs come from the
fault-kind registry) -> checks across fields. Every problem is collected and raised at once as a
ProfileError whose issues name `file:line:column`, the field path and what was expected.
"""

from __future__ import annotations

import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .errors import ProfileError, ProfileIssue
from .faults import REGISTRY, FaultConfig, kinds
from .units import DURATION, Duration
from .yamlsource import Path as DataPath
from .yamlsource import SourceDoc, format_path, load_yaml

HTTP_VERSIONS = ("HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/3")
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"


def _as_list(value: Any) -> Any:
    """Let a single value stand for a list of one, so `method: GET` and `method: [GET]` both work."""
    return [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value


StrList = Annotated[list[str], BeforeValidator(_as_list)]
IntList = Annotated[list[int], BeforeValidator(_as_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    """Which flows a rule applies to. Every condition given must hold; none given = all traffic."""

    host: StrList | None = Field(None, description="glob(s) on the request's host")
    path: StrList | None = Field(None, description="glob(s) on the path, without the query string")
    path_regex: str | None = Field(None, description="regular expression searched in the path")
    method: StrList | None = Field(None, description="HTTP method(s)")
    headers: dict[str, str] | None = Field(None, description="request headers: name (any case) -> value glob")
    response_headers: dict[str, str] | None = Field(
        None, description="response headers: name (any case) -> value glob; checked when response headers arrive"
    )
    status: IntList | None = Field(None, description="response status code(s); checked with response headers")
    http_version: StrList | None = Field(None, description="the client side's protocol: " + ", ".join(HTTP_VERSIONS))
    probability: float | None = Field(None, ge=0, le=1, description="chance that a flow matching the rest is hit")
    first: int | None = Field(None, ge=1, description="only the first N flows that match the rest")
    every: int | None = Field(None, ge=1, description="only every Nth flow that matches the rest")

    @field_validator("path_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"expected a regular expression, got {value!r} ({e})") from None
        return value

    @field_validator("http_version")
    @classmethod
    def _known_versions(cls, value: list[str] | None) -> list[str] | None:
        for v in value or ():
            if v not in HTTP_VERSIONS:
                raise ValueError(f"expected one of {', '.join(HTTP_VERSIONS)}, got {v!r}")
        return value

    @field_validator("method")
    @classmethod
    def _upper_methods(cls, value: list[str] | None) -> list[str] | None:
        return [m.upper() for m in value] if value is not None else None

    @field_validator("status")
    @classmethod
    def _status_range(cls, value: list[int] | None) -> list[int] | None:
        for v in value or ():
            if not 100 <= v <= 599:
                raise ValueError(f"expected an HTTP status from 100 to 599, got {v!r}")
        return value

    @property
    def needs_response(self) -> bool:
        """Conditions that can only be checked once the upstream's response headers are in."""
        return self.response_headers is not None or self.status is not None


class Schedule(_Strict):
    """When a rule is active, counted from the moment its profile was loaded."""

    after: Duration = Field(0.0, description="first window opens this long after load")
    for_: Duration | None = Field(None, alias="for", description="each window lasts this long (default: forever)")
    every: Duration | None = Field(None, description="windows repeat with this period")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def is_active(self, elapsed: float) -> bool:
        if elapsed < self.after:
            return False
        since = elapsed - self.after
        if self.every:
            since %= self.every
        return self.for_ is None or since < self.for_


@cache
def fault_union() -> Any:
    """The discriminated union of every registered kind's config, keyed by `type`."""
    configs = tuple(cls.Config for cls in kinds().values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="type")]


@cache
def _models() -> tuple[type[BaseModel], type[BaseModel]]:
    """Rule and Profile, built once the fault registry is filled (their fault field needs it)."""
    FaultSpec = fault_union()

    class Rule(_Strict):
        name: str = Field(pattern=_NAME_RE, description="unique in the profile; appears in every log line")
        enabled: bool = True
        description: str = ""
        match: Match = Field(default_factory=Match)
        active: Schedule | None = Field(None, description="when the rule is on: {after, for, every}")
        faults: list[FaultSpec] = Field(min_length=1, description="applied together, in order")  # type: ignore[valid-type]

    class Profile(_Strict):
        version: Literal[1] = Field(description="format version; 1")
        name: str | None = Field(None, pattern=_NAME_RE, description="defaults to the file's stem")
        description: str = ""
        references: list[str] = Field(default_factory=list, description="public sources for the numbers in it")
        seed: int | None = Field(None, description="makes probability/first/every/jitter reproducible")
        extends: StrList | None = Field(None, description="profiles (shipped names or paths) whose rules come first")
        rules: list[Rule] = Field(default_factory=list)

    Profile.model_config["title"] = "faultproxy profile (format v1)"
    return Rule, Profile


def rule_model() -> type[BaseModel]:
    return _models()[0]


def profile_model() -> type[BaseModel]:
    return _models()[1]


class LoadedProfile:
    """A validated profile with everything the proxy needs: name, source, rules (base rules first)."""

    def __init__(self, name: str, source: str, model: Any, rules: list[Any]):
        self.name = name
        self.source = source
        self.model = model
        self.rules = rules

    @property
    def description(self) -> str:
        return self.model.description

    @property
    def references(self) -> list[str]:
        return list(self.model.references)

    @property
    def seed(self) -> int | None:
        return self.model.seed

    def scaled(self, factor: float) -> LoadedProfile:
        """The same profile with every duration multiplied by factor (the time scale)."""
        if factor == 1:
            return self
        return LoadedProfile(self.name, self.source, self.model, [scale_durations(r, factor) for r in self.rules])


def scale_durations(value: Any, factor: float) -> Any:
    """Multiply every Duration field, at any depth of models and lists, by factor."""
    if isinstance(value, list):
        return [scale_durations(v, factor) for v in value]
    if not isinstance(value, BaseModel):
        return value
    update: dict[str, Any] = {}
    for name, info in type(value).model_fields.items():
        current = getattr(value, name)
        if current is None:
            continue
        if _is_duration(info.metadata, info.annotation) and isinstance(current, (int, float)):
            update[name] = current * factor
        elif isinstance(current, (BaseModel, list)):
            update[name] = scale_durations(current, factor)
    return value.model_copy(update=update) if update else value


def _is_duration(metadata: list[Any], annotation: Any) -> bool:
    """Whether a field is a Duration, also inside `Duration | None` (where pydantic keeps the marker)."""
    if any(m is DURATION for m in metadata):
        return True
    if typing.get_origin(annotation) is Annotated:
        return any(m is DURATION for m in typing.get_args(annotation)[1:])
    return any(_is_duration([], arg) for arg in typing.get_args(annotation))


# --- locating shipped profiles ---------------------------------------------------------------------


def shipped_dir() -> Path:
    """profiles/ in a checkout (editable installs too), or the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "profiles", here / "_shipped_profiles"):
        if candidate.is_dir():
            return candidate
    return here.parent / "profiles"


def shipped_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}


def resolve_ref(ref: str, relative_to: Path | None = None) -> Path:
    """A profile reference is a path (absolute, or relative to the referring file / cwd) or a shipped name."""
    candidates = []
    p = Path(ref).expanduser()
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to / p)
    candidates.append(p)
    for c in candidates:
        if c.is_file():
            return c
    shipped = shipped_profiles()
    if ref in shipped:
        return shipped[ref]
    known = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"no profile file {ref!r} and no shipped profile of that name (shipped: {known})")


# --- loading ---------------------------------------------------------------------------------------


def load_profile(ref: str | Path | dict, *, _chain: tuple[str, ...] = ()) -> LoadedProfile:
    """Load and validate one profile (path, shipped name, or an inline dict). Raises ProfileError."""
    if isinstance(ref, dict):
        doc = SourceDoc("<inline>", ref)
        default_name = str(ref.get("name") or "inline")
        base_dir = None
    else:
        try:
            path = resolve_ref(str(ref))
        except FileNotFoundError as e:
            raise ProfileError([ProfileIssue(str(ref), 0, 0, "", str(e))]) from None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError([ProfileIssue(str(path), 0, 0, "", f"cannot read the file: {e}")]) from None
        doc = load_yaml(text, _display(path))
        default_name = path.stem
        base_dir = path.parent
    return _build(doc, default_name, base_dir, _chain)


def load_text(text: str, source: str) -> LoadedProfile:
    """Load a profile from YAML text (the control API's uploads)."""
    doc = load_yaml(text, source)
    return _build(doc, Path(source).stem, None, ())


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _build(doc: SourceDoc, default_name: str, base_dir: Path | None, chain: tuple[str, ...]) -> LoadedProfile:
    issues = list(_raw_checks(doc))
    model = None
    if not isinstance(doc.data, dict):
        issues.append(_issue(doc, (), "expected a mapping with 'version: 1' and 'rules'"))
    else:
        try:
            model = profile_model().model_validate(doc.data)
        except ValidationError as e:
            issues.extend(_translate(doc, e))
    base_rules: list[Any] = []
    if model is not None and model.extends:
        for i, ref in enumerate(model.extends):
            key = str((base_dir / ref) if base_dir and not Path(ref).is_absolute() else ref)
            if key in chain or ref in chain:
                issues.append(_issue(doc, ("extends", i), f"profile {ref!r} extends itself (cycle: {' -> '.join(chain)})"))
                continue
            try:
                base = load_profile(resolve_ref(ref, base_dir), _chain=(*chain, doc.source, key, ref))
            except FileNotFoundError as e:
                issues.append(_issue(doc, ("extends", i), str(e)))
                continue
            except ProfileError as e:
                issues.append(_issue(doc, ("extends", i), f"the profile {ref!r} it extends has errors"))
                issues.extend(e.issues)
                continue
            own = {r.name for r in model.rules}
            # A rule of the same name in the extending profile replaces the base one (tweak a timeout).
            base_rules.extend(r for r in base.rules if r.name not in own and r.name not in {b.name for b in base_rules})
    if issues:
        raise ProfileError(issues)
    assert model is not None
    return LoadedProfile(model.name or default_name, doc.source, model, [*base_rules, *model.rules])


def _issue(doc: SourceDoc, path: DataPath, message: str, *, key: bool = False) -> ProfileIssue:
    line, col = doc.key_position(path) if key else doc.position(path)
    return ProfileIssue(doc.source, line, col, format_path(path), message)


def _raw_checks(doc: SourceDoc) -> list[ProfileIssue]:
    """Checks across fields, on the raw data so they are reported together with type errors."""
    issues: list[ProfileIssue] = []
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        return issues
    seen: dict[str, int] = {}
    for i, rule in enumerate(data["rules"]):
        if not isinstance(rule, dict):
            continue
        name = rule.get("name")
        if isinstance(name, str):
            if name in seen:
                issues.append(_issue(doc, ("rules", i, "name"), f"duplicate rule name {name!r} (first used by rules[{seen[name]}])"))
            else:
                seen[name] = i
        match = rule.get("match")
        late = [k for k in ("response_headers", "status") if isinstance(match, dict) and match.get(k) is not None]
        faults = rule.get("faults")
        issues.extend(_connection_level_checks(doc, i, match, faults))
        if late and isinstance(faults, list):
            for j, f in enumerate(faults):
                if not isinstance(f, dict) or f.get("type") not in kinds():
                    continue
                try:
                    cfg = REGISTRY[f["type"]].Config.model_validate(f)
                except ValidationError:
                    continue
                if REGISTRY[f["type"]](cfg).acts_on_request:
                    issues.append(
                        _issue(
                            doc,
                            ("rules", i, "match", late[0]),
                            f"a response condition cannot select a fault that acts before the response "
                            f"(rules[{i}].faults[{j}] is a request-phase {f['type']!r})",
                        )
                    )
    return issues


def _connection_level_checks(doc: SourceDoc, i: int, match: Any, faults: Any) -> list[ProfileIssue]:
    """A rule with a connection-level fault (downgrade) acts at the TLS handshake, where only the host
    (the SNI) is known: any other match condition could never be checked, so it is an error."""
    if not isinstance(faults, list):
        return []
    kinds_ = kinds()
    j = next(
        (
            j
            for j, f in enumerate(faults)
            if isinstance(f, dict) and getattr(kinds_.get(f.get("type")), "connection_level", False)
        ),
        None,
    )
    if j is None or not isinstance(match, dict):
        return []
    kind = faults[j]["type"]
    return [
        _issue(
            doc,
            ("rules", i, "match", key),
            f"a {kind!r} rule acts at the TLS handshake, where only the host (SNI) is known: "
            f"{key!r} cannot be checked there (rules[{i}].faults[{j}] is {kind!r}; allowed in match: host)",
            key=True,
        )
        for key in match
        if key != "host"
    ]


def _unwrap(annotation: Any, data: Any) -> Any:
    """The model class behind an annotation (through Optional, list, Annotated, discriminated unions)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0], data)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        configs = [a for a in args if isinstance(a, type) and issubclass(a, FaultConfig)]
        if configs and isinstance(data, dict):
            kind = data.get("type")
            for c in configs:
                if c.model_fields["type"].annotation.__args__[0] == kind:
                    return c
            return None
        return _unwrap(args[0], data) if len(args) == 1 else None
    return annotation


def _model_at(path: DataPath, data: Any) -> tuple[type[BaseModel] | None, Any]:
    """Walk the data and the model in step, to find which model a path points into."""
    current: Any = profile_model()
    for part in path:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return None, None
            data = data[part]
            current = _unwrap(current, data)
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or not isinstance(data, dict):
            return None, None
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None, None
        data = data.get(part)
        annotation = field.annotation
        if typing.get_origin(_strip_annotated(annotation)) is list:
            current = typing.get_args(_strip_annotated(annotation))[0]
        else:
            current = _unwrap(annotation, data)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current, data
    return None, data


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_annotated(args[0])
    return annotation


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _clean_loc(doc: SourceDoc, loc: tuple[Any, ...]) -> DataPath:
    """Pydantic puts union branch names into locations (the fault kind, 'function-before[...]'); drop them."""
    out: list[str | int] = []
    data = doc.data
    for part in loc:
        if isinstance(data, dict) and part in data or isinstance(data, list) and isinstance(part, int) and part < len(data):
            out.append(part)
            data = data[part]
        elif isinstance(data, dict) and isinstance(part, str) and data.get("type") == part:
            continue  # discriminator tag
        elif isinstance(part, str) and ("[" in part or part in ("str", "int", "list", "float")):
            continue  # validator or union branch name
        else:
            out.append(part)  # a missing or unknown key: keep it, it is what the user must see
            data = None
    return tuple(out)


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _translate(doc: SourceDoc, error: ValidationError) -> list[ProfileIssue]:
    issues: list[ProfileIssue] = []
    seen: set[tuple[DataPath, str]] = set()
    for err in error.errors(include_url=False):
        path = _clean_loc(doc, tuple(err["loc"]))
        kind = err["type"]
        given = err.get("input")
        msg = err["msg"]
        at_key = False
        if kind == "extra_forbidden":
            model, _ = _model_at(path[:-1], doc.data)
            allowed = f" (expected one of: {', '.join(_field_names(model))})" if model else ""
            msg = f"unknown key {path[-1]!r}{allowed}"
            at_key = True
        elif kind == "missing":
            msg = "required field is missing"
            line, col = doc.position(path[:-1])
            key = (path, msg)
            if key not in seen:
                seen.add(key)
                issues.append(ProfileIssue(doc.source, line, col, format_path(path), msg))
            continue
        elif kind == "union_tag_invalid":
            path = (*path, "type")
            msg = f"unknown fault type {given.get('type') if isinstance(given, dict) else given!r} (known: {', '.join(sorted(kinds()))})"
        elif kind == "union_tag_not_found":
            path = (*path, "type")
            msg = f"required field is missing: the fault type, one of {', '.join(sorted(kinds()))}"
            line, col = doc.position(path[:-1])
            issues.append(ProfileIssue(doc.source, line, col, format_path(path), msg))
            continue
        elif kind in ("value_error", "assertion_error"):
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            msg = f"expected {expected}, got {_got(given)}"
        elif msg.startswith("Input should be "):
            msg = f"expected {msg.removeprefix('Input should be ')}, got {_got(given)}"
        elif kind == "too_short":
            msg = f"expected at least {err.get('ctx', {}).get('min_length', 1)} item(s), got none"
        elif kind == "string_pattern_mismatch":
            msg = f"expected a name of letters, digits, '_', '.', ':' or '-', got {_got(given)}"
        key = (path, msg)
        if key in seen:
            continue
        seen.add(key)
        issues.append(_issue(doc, path, msg, key=at_key))
    return issues


# --- whole-file checks and the schema --------------------------------------------------------------


def validate_refs(refs: list[str]) -> list[ProfileIssue]:
    """Every problem in every given profile, for `faultproxy validate`."""
    issues: list[ProfileIssue] = []
    for ref in refs:
        try:
            load_profile(ref)
        except ProfileError as e:
            issues.extend(e.issues)
    return issues


def json_schema() -> dict[str, Any]:
    schema = profile_model().model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://faultproxy.invalid/schema/profile-v1.json"
    return schema
