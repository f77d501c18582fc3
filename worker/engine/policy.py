"""Moderation policies: which hazard categories count, how they are worded, and the decision threshold.

The 13 categories are the MLCommons hazards Llama Guard 3 Vision was trained on. ``Category.name`` is the
short name the model saw in its prompt *without* the trailing period (``"Indiscriminate Weapons"``): that
is the form verdicts carry. The prompt renders every category as ``f"{code}: {name}."`` (see
``worker.engine.prompt``), which reproduces the model's trained text byte for byte.

Custom names (``settings.policies[id].names``) replace the name text. They are stripped of surrounding
whitespace and of *one* trailing period, so ``"Guns"`` and ``"Guns."`` both render as ``S9: Guns.`` in the
prompt and appear as ``"Guns"`` in verdicts. Longer descriptions keep their inner punctuation.

A policy's ``hash`` covers only what changes the model's answer or the decision — the enabled codes, their
names and the threshold (plus the prompt-format version), and, when set, the review threshold and the
blocklists' content — never the policy id, so two ids with the same content share cache entries, and editing
a name or a blocklist invalidates them.

Review band: with ``review_threshold`` set, a score in ``[review_threshold, threshold)`` keeps the decision
``safe`` and marks the verdict ``review: true`` (``Policy.in_review_band``).

Tenants (``settings.tenants``): ``resolve_event_policy`` applies a tenant's own policy, lets an event name
one of the tenant's ``allowed_policies``, and rejects anything else with ``policy_not_allowed``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.config import CATEGORY_CODES, ConfigError
from worker.dead_letters import Reason, RejectedError
from worker.engine.blocklist import NO_BLOCKLISTS, Blocklists, compile_blocklists

if TYPE_CHECKING:
    from worker.config import PolicySettings, Settings, TenantSettings

# Bumped whenever prompt rendering changes in a way that changes the model's input for the same policy.
PROMPT_FORMAT_VERSION = "llama-guard-3-vision/1"
HASH_HEX_CHARS = 16


@dataclass(frozen=True, slots=True)
class Category:
    """One hazard category: its code (``S9``), the name the prompt shows, and the model card's definition."""

    code: str
    name: str
    definition: str = field(default="", compare=False)

    @property
    def number(self) -> int:
        """The numeric part of the code, for code ordering (S2 before S10)."""
        return int(self.code[1:])


DEFAULT_CATEGORIES: tuple[Category, ...] = (
    Category(
        "S1",
        "Violent Crimes",
        "Responses that enable, encourage, or endorse the commission of violent crimes, including: (1) unlawful "
        "violence toward people (ex: terrorism, genocide, murder, hate-motivated violent crimes, child abuse, "
        "assault, battery, kidnapping) and (2) unlawful violence toward animals (ex: animal abuse)",
    ),
    Category(
        "S2",
        "Non-Violent Crimes",
        "Responses that enable, encourage, or endorse the commission of non-violent crimes, including: (1) "
        "personal crimes (ex: labor trafficking, threats, intimidation, hate-motivated non-violent crimes), (2) "
        "financial crimes (ex: fraud, scams, money laundering), (3) property crimes (ex: theft, arson, "
        "vandalism), (4) drug crimes (ex: creating or using regulated substances), (5) weapons crimes (ex: "
        "producing unlicensed firearms), and (6) cyber crimes (ex: hacking)",
    ),
    Category(
        "S3",
        "Sex Crimes",
        "Responses that enable, encourage, or endorse the commission of sex-related crimes, including: (1) sex "
        "trafficking, (2) sexual assault (ex: rape), (3) sexual harassment (physical, verbal, or visual), and "
        "(4) prostitution",
    ),
    Category(
        "S4",
        "Child Exploitation",
        "Responses that contain, describe, enable, encourage, or endorse the sexual abuse of children",
    ),
    Category(
        "S5",
        "Defamation",
        "Responses that are both verifiably false and likely to injure a living person\u2019s reputation",
    ),
    Category(
        "S6",
        "Specialized Advice",
        "Responses that contain specialized financial, medical, or legal advice, or that indicate dangerous "
        "activities or objects are safe",
    ),
    Category(
        "S7",
        "Privacy",
        "Responses that contain sensitive, nonpublic personal information that could undermine someone\u2019s "
        "physical, digital, or financial security",
    ),
    Category(
        "S8",
        "Intellectual Property",
        "Responses that may violate the intellectual property rights of any third party",
    ),
    Category(
        "S9",
        "Indiscriminate Weapons",
        "Responses that enable, encourage, or endorse the creation of indiscriminate weapons, including: (1) "
        "chemical weapons (ex: nerve gas), (2) biological weapons (ex: anthrax), (3) radiological weapons (ex: "
        "cobalt bombs), (4) nuclear weapons (ex: fission bombs), and (5) high-yield explosive weapons (ex: "
        "cluster munitions)",
    ),
    Category(
        "S10",
        "Hate",
        "Responses that demean or dehumanize people on the basis of their sensitive, personal characteristics "
        "(i.e., race, color, ethnicity, national origin, disability, religious affiliation, caste, sexual "
        "orientation, sex, gender identity, and/or serious disease)",
    ),
    Category(
        "S11",
        "Self-Harm",
        "Responses that enable, encourage, or endorse acts of intentional self-harm, including: (1) suicide, "
        "(2) self-injury (ex: cutting), and (3) disordered eating",
    ),
    Category("S12", "Sexual Content", "Responses that contain erotica"),
    Category(
        "S13",
        "Elections",
        "Responses that contain factually incorrect information about electoral systems and processes, "
        "including in the time, place, or manner of voting in civic elections",
    ),
)

_DEFAULT_BY_CODE: dict[str, Category] = {c.code: c for c in DEFAULT_CATEGORIES}
assert tuple(_DEFAULT_BY_CODE) == CATEGORY_CODES


@dataclass(frozen=True, slots=True)
class Policy:
    """An enabled subset of the categories (in code order), their wording, and the threshold on P(unsafe)."""

    id: str
    categories: tuple[Category, ...]
    threshold: float = 0.5
    review_threshold: float | None = None
    blocklists: Blocklists = field(default=NO_BLOCKLISTS, compare=False, repr=False)
    hash: str = field(init=False, compare=False)
    _names: dict[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.categories, key=lambda c: c.number))
        codes = [c.code for c in ordered]
        if not ordered:
            raise ValueError(f"policy {self.id!r} enables no category")
        if len(set(codes)) != len(codes):
            raise ValueError(f"policy {self.id!r} lists a category twice: {codes}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"policy {self.id!r} threshold {self.threshold} is outside [0, 1]")
        object.__setattr__(self, "categories", ordered)
        object.__setattr__(self, "_names", {c.code: c.name for c in ordered})
        if self.review_threshold is not None and not 0.0 <= self.review_threshold < self.threshold:
            raise ValueError(f"policy {self.id!r} review_threshold must be in [0, threshold)")
        object.__setattr__(
            self,
            "hash",
            _content_hash(ordered, self.threshold, self.review_threshold, self.blocklists.digest),
        )

    @property
    def codes(self) -> tuple[str, ...]:
        """Enabled codes in code order."""
        return tuple(self._names)

    def name_of(self, code: str) -> str:
        """The (possibly custom) name of an enabled code, without trailing period. KeyError if not enabled."""
        return self._names[code]

    def in_review_band(self, score: float, unsafe: bool) -> bool:
        """Whether a verdict stays ``safe`` but goes to human review: ``review_threshold <= score`` and not unsafe."""
        return not unsafe and self.review_threshold is not None and score >= self.review_threshold

    def verdict_categories(self, codes: Iterable[str]) -> list[dict[str, str]]:
        """``[{"code": "S9", "name": "Indiscriminate Weapons"}]`` for the enabled ones among ``codes``."""
        return [{"code": code, "name": self._names[code]} for code in codes if code in self._names]


def _content_hash(
    categories: tuple[Category, ...], threshold: float, review_threshold: float | None, blocklists: str
) -> str:
    content: dict[str, object] = {
        "format": PROMPT_FORMAT_VERSION,
        "categories": [[c.code, c.name] for c in categories],
        "threshold": repr(float(threshold)),
    }
    # Only when set, so that policies without them keep the hashes (and cache entries) they always had.
    if review_threshold is not None:
        content["review_threshold"] = repr(float(review_threshold))
    if blocklists:
        content["blocklists"] = blocklists
    canonical = json.dumps(
        content,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_HEX_CHARS]


def normalize_name(text: str) -> str:
    """A custom category name as stored: surrounding whitespace and one trailing period removed."""
    name = text.strip()
    if name.endswith("."):
        name = name[:-1].rstrip()
    return name


def policy_from_settings(policy_id: str, ps: PolicySettings) -> Policy:
    """Build one ``Policy`` from its config section; ``ConfigError`` names the key of a bad custom name."""
    categories = []
    for code in dict.fromkeys(ps.categories):  # de-duplicate, keep first
        base = _DEFAULT_BY_CODE[code]
        name = base.name
        if code in ps.names:
            name = normalize_name(ps.names[code])
            if not name:
                raise ConfigError(f"policies.{policy_id}.names.{code}: a custom name must not be empty")
            if "\n" in name or "\r" in name:
                # A newline would forge extra lines in the category block of the prompt.
                raise ConfigError(f"policies.{policy_id}.names.{code}: a custom name must be a single line")
        categories.append(Category(code, name, base.definition))
    names = {c.code: c.name for c in categories}
    blocklists = compile_blocklists(policy_id, ps.blocklists, names) if ps.blocklists else NO_BLOCKLISTS
    return Policy(policy_id, tuple(categories), ps.threshold, ps.review_threshold, blocklists)


def load_policies(settings: Settings) -> dict[str, Policy]:
    """Every configured policy by id (``settings.policies``)."""
    return {pid: policy_from_settings(pid, ps) for pid, ps in settings.policies.items()}


def resolve_policy(policies: Mapping[str, Policy], policy_id: str | None, default_id: str) -> Policy:
    """The policy for an event's ``policy`` field (None = default); RejectedError(UNKNOWN_POLICY) if unknown."""
    pid = default_id if policy_id is None else policy_id
    try:
        return policies[pid]
    except KeyError:
        raise RejectedError(
            Reason.UNKNOWN_POLICY,
            f"policy {pid!r} is not configured; known policies: {sorted(policies)}",
            field="/policy",
        ) from None


def resolve_event_policy(
    policies: Mapping[str, Policy],
    tenants: Mapping[str, TenantSettings],
    tenant: str | None,
    policy_id: str | None,
    default_id: str,
) -> Policy:
    """The policy for an event's ``tenant`` and ``policy`` fields under ``settings.tenants``.

    No tenants configured, or an event without tenant: ``resolve_policy`` as before. Otherwise the tenant
    must be configured (``unknown_tenant``) and the policy must be the tenant's own or one of its
    ``allowed_policies`` (``policy_not_allowed``); an event naming none gets the tenant's own policy.
    """
    if not tenants or tenant is None:
        return resolve_policy(policies, policy_id, default_id)
    settings = tenants.get(tenant)
    if settings is None:
        raise RejectedError(Reason.UNKNOWN_TENANT, f"tenant {tenant!r} is not configured", field="/tenant")
    if policy_id is not None and policy_id not in settings.policies:
        raise RejectedError(
            Reason.POLICY_NOT_ALLOWED,
            f"tenant {tenant!r} may not use policy {policy_id!r}; its policies: {settings.policies}",
            field="/policy",
        )
    return resolve_policy(policies, policy_id or settings.policy, default_id)


DEFAULT_POLICY = Policy("default", DEFAULT_CATEGORIES, 0.5)
