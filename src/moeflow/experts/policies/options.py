"""Policy options from ``PolicyContext.options`` (EngineConfig.extra or ``--option key=value``), typed like the
policy's own fields."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

FALSE = ("0", "false", "no", "off")


def apply_options(policy: object, options: Mapping, names: Iterable[str | tuple[str, str]]) -> set[str]:
    """Set each option in ``names`` that ``options`` holds onto ``policy``, cast to the type of the attribute it
    replaces (booleans accept 1/0, true/false, yes/no, on/off). An entry ``(option, attribute)`` maps a differently
    named option. Returns the option names that were given."""
    given = set()
    for entry in names:
        option, attr = (entry, entry) if isinstance(entry, str) else entry
        if option not in options:
            continue
        value, current = options[option], getattr(policy, attr)
        if isinstance(current, bool):
            value = str(value).lower() not in FALSE
        setattr(policy, attr, type(current)(value))
        given.add(option)
    return given
