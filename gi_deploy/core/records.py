"""What every typed record (run.json, a bundle's and the router's manifest.json) shares: a field
reader that checks each field's type and range and names it when refused, and the seal.

Modelled on peft's ``PeftConfigMixin`` (a dataclass written with ``to_dict`` and read back with a
classmethod that refuses what does not fit) and timm's ``PretrainedCfg`` (one dataclass that
travels with the model). A record is read once, by its ``from_dict``; everything after that uses
its attributes, never the raw dict.

The seal: an artifact's manifest records ``seal = {"sha256": H, "fields": {path: digest}}``, where
``path`` is a top-level field or, for an object, ``field.key`` (``ood.threshold``,
``files.model.onnx``), ``digest`` the first 16 hex digits of the sha256 of its canonical JSON, and
``H`` the sha256 of the canonical JSON of ``fields``. Every field is sealed, so nothing the runtime
acts on (classes, preprocessing, source order, thresholds, file names and their sha256) can be
edited unseen, and a refusal names the field that changed. The seal is integrity, not
authenticity: it catches an edited or damaged manifest, not a forger who recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from gi_deploy.errors import BundleError

SEAL_FIELD = "seal"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()


def canonical_json(value: Any) -> str:
    """The one serialisation every hash here is taken of: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _sealed_fields(record: dict) -> dict[str, str]:
    fields = {}
    for key, value in record.items():
        if key == SEAL_FIELD:
            continue
        if isinstance(value, dict) and value:
            for sub, v in value.items():
                fields[f"{key}.{sub}"] = canonical_sha256(v)[:16]
        else:
            fields[key] = canonical_sha256(value)[:16]
    return fields


def seal_of(record: dict) -> dict:
    """The seal of a record's JSON form (every field but the seal itself)."""
    fields = _sealed_fields(record)
    return {"sha256": canonical_sha256(fields), "fields": fields}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_seal(record: dict, where: Path, fix: str) -> None:
    """Refuse a record whose fields differ from what was sealed when it was written, naming the
    first field that differs (added, removed or changed). Raises BundleError."""
    seal = record.get(SEAL_FIELD)
    if not (isinstance(seal, dict) and isinstance(seal.get("fields"), dict) and isinstance(seal.get("sha256"), str)):
        raise BundleError(f"{where}: field {SEAL_FIELD} is missing or malformed ({_shown(seal)}): its content cannot "
                          f"be checked; it was edited or written by an older gi-deploy: {fix}")
    now, then = _sealed_fields(record), seal["fields"]
    # a sub-field first: emptying an object shows as the object "added" and its last key removed
    changed = sorted((k for k in now.keys() | then.keys() if now.get(k) != then.get(k)),
                     key=lambda k: ("." not in k, k))
    if changed:
        f = changed[0]
        how = ("was added since" if f not in then else "was removed since" if f not in now
               else "differs from what was sealed when")
        value = _dotted(record, f)
        also = f" (so did {', '.join(changed[1:4])})" if changed[1:] else ""
        raise BundleError(f"{where}: field {f}{'' if value is _MISSING else ' = ' + _shown(value)} {how} it was "
                          f"written{also}; {fix}")
    if canonical_sha256(then) != seal["sha256"]:
        raise BundleError(f"{where}: field {SEAL_FIELD}.sha256 does not match its fields; it was edited: {fix}")


def _dotted(record: dict, path: str) -> Any:
    if path in record:
        return record[path]
    key, _, sub = path.partition(".")
    holder = record.get(key)
    return holder.get(sub, _MISSING) if isinstance(holder, dict) else _MISSING


class Fields:
    """Typed reads of one JSON object for a record's ``from_dict``. Every getter checks the value's
    type and range and raises BundleError naming the file, the field (dotted), its value and ``fix``.

    ``reader.text("source")`` -> the value; ``reader.sub("ood")`` -> a reader of a nested object."""

    def __init__(self, data: Any, where: Path | str, fix: str, prefix: str = ""):
        self.where, self.fix, self.prefix = where, fix, prefix
        if not isinstance(data, dict):
            raise self.bad(prefix.rstrip(".") or "(top level)", data, "must be a JSON object")
        self.data = data

    def bad(self, field: str, value: Any, why: str) -> BundleError:
        return BundleError(f"{self.where}: field {field} = {_shown(value)} {why}; {self.fix}")

    def name(self, key: str) -> str:
        return self.prefix + key

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise BundleError(f"{self.where} has no {self.name(key)!r} field; {self.fix}")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = _MISSING, pattern: re.Pattern | None = None,
            choices: tuple[str, ...] | None = None, what: str = "a non-empty string") -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str) or not v.strip() or (pattern is not None and not pattern.fullmatch(v)):
            raise self.bad(self.name(key), v, f"must be {what}")
        if choices is not None and v not in choices:
            raise self.bad(self.name(key), v, f"must be one of {', '.join(choices)}")
        return v

    def sha256(self, key: str) -> str:
        return self.text(key, pattern=_SHA256, what="a sha256 hex digest (64 lowercase hex digits)")

    def integer(self, key: str, lo: int | None = None, hi: int | None = None, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.bad(self.name(key), v, f"must be an integer in {_range(lo, hi)}")
        return v

    def number(self, key: str, lo: float | None = None, hi: float | None = None, default: Any = _MISSING,
               lo_open: bool = False) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise self.bad(self.name(key), v, f"must be a finite number in {_range(lo, hi, lo_open)}")
        return float(v)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if not isinstance(v, bool) and not (v is default and default is not _MISSING):
            raise self.bad(self.name(key), v, "must be true or false")
        return v

    def obj(self, key: str, default: Any = _MISSING) -> Any:
        """A nested object kept as a dict (informational numbers: verification gates, versions)."""
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, dict):
            raise self.bad(self.name(key), v, "must be an object")
        return v

    def sub(self, key: str, default: Any = _MISSING) -> Any:
        """A reader of the nested object ``key`` (``default`` when absent or null and a default is given)."""
        v = self.raw(key, default)
        if (v is default or v is None) and default is not _MISSING:
            return default
        return Fields(v, self.where, self.fix, f"{self.name(key)}.")

    def str_list(self, key: str, default: Any = _MISSING, unique: bool = False, nonempty: bool = True) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list) or (nonempty and not v):
            raise self.bad(self.name(key), v, f"must be a {'non-empty ' if nonempty else ''}list of names")
        bad = [x for x in v if not isinstance(x, str) or not x.strip()]
        if bad:
            raise self.bad(self.name(key), bad[0], "is not a name (a non-empty string)")
        dupes = sorted({x for x in v if v.count(x) > 1})
        if unique and dupes:
            raise self.bad(self.name(key), dupes, "appear more than once")
        return tuple(v)

    def rest(self, *known: str) -> dict:
        """The fields this record does not type (kept, sealed and written back as they are)."""
        return {k: v for k, v in self.data.items() if k not in known}


def _range(lo, hi, lo_open: bool = False) -> str:
    left = "(" if lo_open else "["
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of an artifact: its sha256 and size (``files.<name>``)."""

    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def read(cls, f: Fields) -> FileEntry:
        return cls(f.sha256("sha256"), f.integer("bytes", 0))


def as_dict(record: Any) -> dict:
    """A record dataclass -> its JSON form: nested records by their own ``to_dict``, tuples as lists,
    fields holding None left out where the record says so (``_omit_none``)."""
    out = {}
    omit = getattr(record, "_omit_none", ())
    for f in dataclasses.fields(record):
        if f.name.startswith("_") or f.name == "extra":
            continue
        v = getattr(record, f.name)
        if v is None and f.name in omit:
            continue
        out[f.name] = _plain(v)
    out.update(getattr(record, "extra", None) or {})
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return _plain(v.to_dict())
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# The largest model input side a manifest may ask for: endoscopy frames are at most ~2k px, and a
# 4096x4096 float32 batch of 32 is already 6 GB. A larger value is an edited manifest, refused
# before anything is allocated.
MAX_INPUT_SIDE = 4096


def read_preprocess(f: Fields, key: str = "preprocess"):
    """The ``PreprocessSpec`` under ``key``, every field type- and range-checked first (so an edited
    value is named, never a KeyError or TypeError from the constructor)."""
    from gi_deploy.core.preprocess import PreprocessSpec  # core/preprocess needs Pillow; records stay light

    p = f.sub(key)
    size = p.raw("size")
    if not (isinstance(size, list) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIDE for v in size)):
        raise f.bad(p.name("size"), size, f"must be [height, width], integers in 1..{MAX_INPUT_SIDE}")
    for name in ("mean", "std"):
        v = p.raw(name)
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise f.bad(p.name(name), v, "must be 3 finite numbers")
    spec = dict(size=tuple(size), mean=tuple(p.raw("mean")), std=tuple(p.raw("std")),
                interpolation=p.text("interpolation", "bilinear"), resize=p.text("resize", "direct"),
                crop_pct=p.number("crop_pct", 0.0, 1.0, default=1.0, lo_open=True), decode=p.text("decode", "full"))
    try:
        return PreprocessSpec(**spec)
    except ValueError as e:  # ConfigError from the spec's own checks (interpolation, std > 0, ...)
        raise f.bad(p.name("").rstrip("."), p.data, f"is refused: {e}") from e
