"""Models by name: the model groups the replicas name in their hellos, aliases, and which name a request gets.

A replica says which model names it serves (``models`` in its hello and heartbeats, the protocol's
``MODELS_KEY``; the echo node's ``ECHO_MODELS`` in the YAML); the replicas naming one model form its
group, and the bridge sends a request for that name to them only (``ReplicaSet.outside_group``).
With no group, or one, any name is accepted as before unless ``--strict-models``; with two or more a
name no live-or-restarting replica serves is 404 ``model_not_found`` (docs/team.md, "Models by name").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFound

if TYPE_CHECKING:
    from ..replicas import Replica
    from ..settings import Settings


def parse_aliases(entries: Sequence[str]) -> dict[str, str]:
    """``("gpt-4o=qwen2.5-vl-3b", …)`` -> ``{"gpt-4o": "qwen2.5-vl-3b"}``; ``ValueError`` naming a bad entry."""
    aliases: dict[str, str] = {}
    for entry in entries:
        alias, equals, target = (part.strip() for part in entry.partition("="))
        if not equals or not alias or not target or alias == target:
            raise ValueError(f"model_alias: {entry!r} is not ALIAS=MODEL")
        aliases[alias] = target
    return aliases


class ModelCatalog:
    """What the server serves, by name, read from the replicas each time (they come and go)."""

    def __init__(self, settings: Settings, replicas: Callable[[], Sequence[Replica]]) -> None:
        self.settings = settings
        self.replicas = replicas
        self.aliases = parse_aliases(settings.model_alias)
        self._said: tuple[tuple[str, ...], ...] | None = None
        self._groups: dict[str, list[Replica]] = {}

    def groups(self) -> dict[str, list[Replica]]:
        """Model name -> the replicas that said they serve it, in the order the dataflow lists them.

        Kept while no replica's ``models`` changed (a hello): every request asks, hellos are rare.
        """
        replicas = self.replicas()
        said = tuple(r.models for r in replicas)
        if said != self._said:
            groups: dict[str, list[Replica]] = {}
            for replica in replicas:
                for name in replica.models:
                    groups.setdefault(name, []).append(replica)
            self._said, self._groups = said, groups
        return self._groups

    def resolve(self, requested: str | None, param: str = "model") -> str:
        """The model a request gets (its alias followed; the default when it names none); 404 when none serves it."""
        if requested is None:
            return self.settings.default_model
        name = self.aliases.get(requested, requested)
        groups = self.groups()
        if groups:
            if name in groups or (len(groups) == 1 and not self.settings.strict_models):
                return name
            raise ModelNotFound(
                f"The model '{requested}' does not exist; this server has {', '.join(sorted(groups))}.", param=param
            )
        models = self.settings.models
        if (models or self.settings.strict_models) and name not in (models or (self.settings.default_model,)):
            served = ", ".join(models or (self.settings.default_model,))
            raise ModelNotFound(f"The model '{requested}' does not exist; this server has {served}.", param=param)
        return name

    def cards(self, created: int) -> list[dict[str, Any]]:
        """``/v1/models``: each group with its replica counts (or the configured names), then each alias."""
        groups = self.groups()
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "dora",
                "replicas": len(members),
                "live_replicas": sum(r.live for r in members),
            }
            for name, members in groups.items()
        ] or [
            {"id": name, "object": "model", "created": created, "owned_by": "dora"}
            for name in self.settings.models or (self.settings.default_model,)
        ]
        known = {card["id"] for card in cards}
        cards += [
            {"id": alias, "object": "model", "created": created, "owned_by": "dora", "alias_of": target}
            for alias, target in self.aliases.items()
            if target in known
        ]
        return cards

    def health(self) -> dict[str, dict[str, int]]:
        """``/health``'s ``models``: each group's replicas and how many are live."""
        return {name: {"replicas": len(members), "live": sum(r.live for r in members)} for name, members in self.groups().items()}
