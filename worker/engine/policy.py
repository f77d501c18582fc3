"""Moderation policies: which hazard categories count, how they are worded, and the decision threshold.

The 13 categories are the MLCommons hazards Llama Guard 3 Vision was trained on. ``Category.name`` is the
short name the model saw in its prompt *without* the trailing period (``"Indiscriminate Weapons"``): that
is the form verdicts carry. The prompt renders every category as ``f"{code}: {name}."`` (see
``worker.engine.prompt``), which reproduces the model's trained text byte for byte.

Custom names (``settings.policies[id].names``) replace the name text. They are stripped of surrounding
whitespace and of *one* trailing period, so ``"Guns"`` and ``"Guns."`` both render as ``S9: Guns.`` in the
prompt and appear as ``"Guns"`` in verdicts. Longer descriptions keep their inner punctuation.

Built-in categories depend on the judging model's family (``worker.engine.families``): S1–S13 for Llama
Guard 3 1B and Vision, S1–S14 (S14: Code Interpreter Abuse) for Llama Guard 3 8B and 4. A policy without
``categories`` enables all of its model's built-ins; Llama Guard 4's template then drops S14 for conversations
with images (``Policy.image_categories``). ``custom_categories`` add new codes after the built-ins (e.g.
``S14`` for Vision, ``S15`` for Llama Guard 4), listed after them in the prompt exactly as the templates render
a ``categories`` argument: ``{code}: {text}.``.

A policy's ``hash`` covers only what changes the model's answer or the decision — the listed codes, their
names (custom ones included) and the threshold (plus the prompt-format version) — never the policy id, so two
ids with the same content share cache entries, and editing a name invalidates them. When set,
the review threshold and the blocklists' content count too (only then, so existing hashes stay).

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
from worker.contracts.rejections import Reason, RejectedError
from worker.engine.blocklist import NO_BLOCKLISTS, Blocklists, compile_blocklists
from worker.engine.families import DEFAULT_FAMILY, RenderedCategory, get_family

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
    custom: bool = False  # a policy's own category (``custom_categories``), not one the model was trained on

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

CODE_INTERPRETER_ABUSE = Category(
    "S14",
    "Code Interpreter Abuse",
    "Responses that seek to abuse code interpreters, including those that enable denial of service attacks, "
    "container escapes or privilege escalation exploits",
)
_DEFAULT_BY_CODE: dict[str, Category] = {c.code: c for c in DEFAULT_CATEGORIES}
assert tuple(_DEFAULT_BY_CODE) == CATEGORY_CODES
_BUILTIN_BY_CODE: dict[str, Category] = {**_DEFAULT_BY_CODE, "S14": CODE_INTERPRETER_ABUSE}


@dataclass(frozen=True, slots=True)
class Policy:
    """An enabled subset of the categories (in code order), their wording, and the threshold on P(unsafe)."""

    id: str
    categories: tuple[Category, ...]
    threshold: float = 0.5
    # The categories listed when the conversation holds an image, where the family's template lists fewer by
    # default (Llama Guard 4 drops S14); None = the same as ``categories``.
    image_categories: tuple[Category, ...] | None = None
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
        if self.image_categories is not None:
            object.__setattr__(
                self, "image_categories", tuple(sorted(self.image_categories, key=lambda c: c.number))
            )
        object.__setattr__(
            self,
            "hash",
            _content_hash(
                ordered,
                self.threshold,
                self.image_categories,
                self.review_threshold,
                self.blocklists.digest,
            ),
        )
        if self.review_threshold is not None and not 0.0 <= self.review_threshold < self.threshold:
            raise ValueError(f"policy {self.id!r} review_threshold must be in [0, threshold)")

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

    @property
    def custom_codes(self) -> tuple[str, ...]:
        """Codes of the policy's own categories (``custom_categories``), in code order."""
        return tuple(c.code for c in self.categories if c.custom)

    def verdict_categories(self, codes: Iterable[str]) -> list[dict[str, object]]:
        """``[{"code": "S9", "name": "Indiscriminate Weapons"}]`` for the enabled ones among ``codes``.

        A custom category also carries ``"custom": true``; its ``name`` is the policy's text for it.
        """
        custom = set(self.custom_codes)
        return [
            {"code": code, "name": self._names[code], **({"custom": True} if code in custom else {})}
            for code in codes
            if code in self._names
        ]

    def rendered_categories(self, *, has_image: bool) -> list[RenderedCategory]:
        """The category block's entries as the templates' ``categories`` argument holds them (``"Hate."``)."""
        listed = self.image_categories if has_image and self.image_categories is not None else self.categories
        return [RenderedCategory(c.code, f"{c.name}.") for c in listed]


def _content_hash(
    categories: tuple[Category, ...],
    threshold: float,
    image_categories: tuple[Category, ...] | None,
    review_threshold: float | None = None,
    blocklists: str = "",
) -> str:
    content: dict[str, object] = {
        "format": PROMPT_FORMAT_VERSION,
        "categories": [[c.code, c.name] for c in categories],
        "threshold": repr(float(threshold)),
    }
    if image_categories is not None:
        content["image_categories"] = [[c.code, c.name] for c in image_categories]
    # Only when set, so that policies without them keep the hashes (and cache entries) they always had.
    if review_threshold is not None:
        content["review_threshold"] = repr(float(review_threshold))
    if blocklists:
        content["blocklists"] = blocklists
    canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_HEX_CHARS]


def normalize_name(text: str) -> str:
    """A custom category name as stored: surrounding whitespace and one trailing period removed."""
    name = text.strip()
    if name.endswith("."):
        name = name[:-1].rstrip()
    return name


def _checked_text(text: str, key: str) -> str:
    name = normalize_name(text)
    if not name:
        raise ConfigError(f"{key}: must not be empty")
    if "\n" in name or "\r" in name:
        # A newline would forge extra lines in the category block of the prompt.
        raise ConfigError(f"{key}: must be a single line")
    return name


def policy_from_settings(policy_id: str, ps: PolicySettings, family: str = DEFAULT_FAMILY) -> Policy:
    """Build one ``Policy`` for a model of ``family``; ``ConfigError`` names the key of a bad entry."""
    spec = get_family(family)
    builtins = spec.builtin_codes
    chosen = builtins if ps.categories is None else tuple(dict.fromkeys(ps.categories))
    outside = [c for c in chosen if c not in builtins]
    if outside:
        raise ConfigError(
            f"policies.{policy_id}.categories: {outside} are not built-in categories of {family} "
            f"({builtins[0]}..{builtins[-1]}); add them under policies.{policy_id}.custom_categories instead"
        )

    def builtin(code: str) -> Category:
        base = _BUILTIN_BY_CODE[code]
        name = base.name
        if code in ps.names:
            name = _checked_text(ps.names[code], f"policies.{policy_id}.names.{code}")
        return Category(code, name, base.definition)

    last = int(builtins[-1][1:])
    custom = []
    for code, text in ps.custom_categories.items():
        if int(code[1:]) <= last:
            raise ConfigError(
                f"policies.{policy_id}.custom_categories.{code}: {family} has built-in categories up to "
                f"{builtins[-1]}; custom codes start at S{last + 1}"
            )
        custom.append(
            Category(code, _checked_text(text, f"policies.{policy_id}.custom_categories.{code}"), custom=True)
        )
    categories = tuple(builtin(c) for c in chosen) + tuple(custom)
    image_categories = None
    if ps.categories is None and spec.image_drops:
        # The template's own default for image conversations (Llama Guard 4 leaves out S14).
        image_categories = tuple(c for c in categories if c.code not in spec.image_drops)
    names = {c.code: c.name for c in categories}
    blocklists = compile_blocklists(policy_id, ps.blocklists, names) if ps.blocklists else NO_BLOCKLISTS
    return Policy(policy_id, categories, ps.threshold, image_categories, ps.review_threshold, blocklists)


def load_policies(settings: Settings, family: str | None = None) -> dict[str, Policy]:
    """Every configured policy by id (``settings.policies``), for a model of ``family`` (default: ``model.family``)."""
    family = family or settings.model.family
    return {pid: policy_from_settings(pid, ps, family) for pid, ps in settings.policies.items()}


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
