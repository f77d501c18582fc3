"""Blocklists: exact terms and RE2 patterns matched against the judged text before the model.

Matching runs on *folded* text, and terms and patterns are folded the same way when compiled:

1. Unicode NFKC (full-width ``Ｂ`` → ``B``, ligatures, superscripts),
2. a confusables fold: ``anyascii`` transliterates every character to ASCII, so Cyrillic ``а``/``о``,
   Greek ``Α`` and mathematical letters collapse onto the Latin letters they imitate,
3. ``casefold``.

Patterns are not folded (case-folding ``\\S`` would turn it into ``\\s``): they run case-insensitively on the
folded text, so write them in ASCII for the letters they should match.

Terms are found with one Aho-Corasick automaton per blocklist (``pyahocorasick``): a single pass over the
text whatever the number of terms. Patterns use RE2 (``google-re2``), whose matching is linear in the text:
no pattern can backtrack catastrophically on hostile input. A pattern RE2 does not accept (backreferences,
lookaround) is a configuration error at start.

The fold widens matches on purpose (a term also matches its look-alikes); its cost is that text in other
scripts is compared through its Latin transliteration, so a term can match a transliterated word in another
language. Verdicts name the list and the category of a hit, never the matched text.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anyascii import anyascii

from worker.config import ConfigError

if TYPE_CHECKING:
    from worker.config import BlocklistSettings


def fold(text: str) -> str:
    """Text as blocklists see it: NFKC, confusables transliterated to ASCII, case-folded."""
    return anyascii(unicodedata.normalize("NFKC", text)).casefold()


@dataclass(frozen=True, slots=True)
class BlocklistHit:
    """One blocklist that matched: its name, category, action and whether a term or a pattern hit."""

    list: str
    category: str
    name: str
    action: str  # "halt" | "annotate"
    kind: str  # "term" | "pattern"

    def as_dict(self) -> dict[str, str]:
        return {
            "list": self.list,
            "category": self.category,
            "name": self.name,
            "action": self.action,
            "kind": self.kind,
        }


@dataclass(frozen=True, slots=True)
class _CompiledList:
    name: str
    category: str
    category_name: str
    action: str
    automaton: Any  # ahocorasick.Automaton or None
    patterns: Any  # re2 compiled alternation or None


class Blocklists:
    """The compiled blocklists of one policy; ``match(text)`` lists the hits, halting lists first."""

    def __init__(self, lists: tuple[_CompiledList, ...], digest: str) -> None:
        self._lists = lists
        self.digest = digest  # part of the policy hash: editing a list invalidates cached verdicts

    def __bool__(self) -> bool:
        return bool(self._lists)

    def match(self, texts: Iterable[str]) -> tuple[BlocklistHit, ...]:
        """Every list with a term or pattern in ``texts`` (joined by newlines), halting lists first."""
        if not self._lists:
            return ()
        folded = fold("\n".join(texts))
        hits = []
        for lst in self._lists:
            kind = None
            if lst.automaton is not None and next(lst.automaton.iter(folded), None) is not None:
                kind = "term"
            elif lst.patterns is not None and lst.patterns.search(folded) is not None:
                kind = "pattern"
            if kind is not None:
                hits.append(BlocklistHit(lst.name, lst.category, lst.category_name, lst.action, kind))
        hits.sort(key=lambda h: h.action != "halt")
        return tuple(hits)


def compile_blocklists(
    policy_id: str, lists: Mapping[str, BlocklistSettings], category_names: Mapping[str, str]
) -> Blocklists:
    """Compile a policy's ``blocklists`` section; ``ConfigError`` names the list of a bad pattern.

    ``category_names`` maps the policy's S-codes to their names (a hit's default name).
    """
    import ahocorasick
    import re2

    compiled = []
    for list_name, ls in sorted(lists.items()):
        automaton = None
        terms = [fold(t) for t in ls.terms if fold(t).strip()]
        if terms:
            automaton = ahocorasick.Automaton()
            for term in terms:
                automaton.add_word(term, term)
            automaton.make_automaton()
        patterns = None
        if ls.patterns:
            alternatives = []
            for i, pattern in enumerate(ls.patterns):
                try:
                    re2.compile(pattern)
                except re2.error as exc:
                    raise ConfigError(
                        f"policies.{policy_id}.blocklists.{list_name}.patterns[{i}]: not an RE2 pattern ({exc})"
                    ) from None
                alternatives.append(f"(?:{pattern})")
            patterns = re2.compile("(?i:" + "|".join(alternatives) + ")")
        name = ls.name or category_names.get(ls.category, ls.category)
        compiled.append(_CompiledList(list_name, ls.category, name, ls.action, automaton, patterns))
    canonical = json.dumps(
        {
            n: [ls.category, ls.name, ls.action, sorted(ls.terms), list(ls.patterns)]
            for n, ls in lists.items()
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return Blocklists(tuple(compiled), hashlib.sha256(canonical.encode()).hexdigest()[:16] if lists else "")


NO_BLOCKLISTS = Blocklists((), "")
