"""Which of a model's classes are normal, landmarks, view quality and findings.

The built-in ``kvasir`` source knows its roles (Kvasir-Capsule's 11 classes); any source can be
given them (``--normal``, ``--landmark``, ``--quality``); every class not named is a finding.
Landmarks are ordered: the first marks stomach -> small bowel (the pylorus), the second small
bowel -> colon (the ileocecal valve).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gi_deploy.errors import ConfigError

SECTIONS = ("stomach", "small bowel", "colon")

# Kvasir-Capsule's classes by role (spellings compared by key(): "Ileo-cecal valve" = "ileocecal valve")
BUILTIN_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "kvasir": {
        "normal": ("normal clean mucosa",),
        "landmark": ("pylorus", "ileocecal valve"),
        "quality": ("reduced mucosal view",),
    },
}


def key(name: str) -> str:
    """Spelling-insensitive class key: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class ClassRoles:
    """Class indices (into ``classes``) by role. ``landmarks`` is ordered (see the module docstring)
    and may have 0, 1 or 2 entries; ``findings`` are the classes in no other role."""

    classes: tuple[str, ...]
    normal: tuple[int, ...]
    landmarks: tuple[int, ...]
    quality: tuple[int, ...]
    findings: tuple[int, ...]

    def names(self, role: str) -> list[str]:
        return [self.classes[i] for i in getattr(self, role)]

    def to_dict(self) -> dict:
        return {r: self.names(r) for r in ("normal", "landmarks", "quality", "findings")}


def _resolve(names: tuple[str, ...] | list[str], classes: list[str], flag: str, source: str) -> tuple[int, ...]:
    by_key = {key(c): i for i, c in enumerate(classes)}
    out = []
    for n in names:
        if key(n) not in by_key:
            raise ConfigError(
                f"{flag} {n!r} is not a class of the {source} model; its classes are {', '.join(classes)}"
            )
        out.append(by_key[key(n)])
    return tuple(out)


def class_roles(
    source: str,
    classes: list[str],
    normal: list[str] | None = None,
    landmark: list[str] | None = None,
    quality: list[str] | None = None,
) -> ClassRoles:
    """The roles of ``classes`` (the model's class order). Names given override the built-in
    source's roles one role at a time. Raises ConfigError naming a class the model does not have,
    a class given two roles, more than two landmarks, or no finding class left."""
    builtin = BUILTIN_ROLES.get(key(source), {})
    given = {"normal": normal, "landmark": landmark, "quality": quality}
    roles = {
        r: _resolve(given[r] if given[r] is not None else builtin.get(r, ()), classes, f"--{r}", source) for r in given
    }
    if len(roles["landmark"]) > 2:
        raise ConfigError(
            f"--landmark takes at most two classes in order (stomach -> small bowel, small bowel -> "
            f"colon), got {', '.join(classes[i] for i in roles['landmark'])}"
        )
    seen: dict[int, str] = {}
    for role, idx in roles.items():
        for i in idx:
            if i in seen and seen[i] != role:
                raise ConfigError(f"class {classes[i]!r} is given two roles ({seen[i]} and {role}); give it one")
            seen[i] = role
    findings = tuple(i for i in range(len(classes)) if i not in seen)
    if not findings:
        raise ConfigError(
            f"no finding class is left in {', '.join(classes)} after --normal/--landmark/--quality; "
            "leave at least one class as a finding"
        )
    return ClassRoles(tuple(classes), roles["normal"], roles["landmark"], roles["quality"], findings)
