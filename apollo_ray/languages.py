"""The 50 languages of Apollo-MoE, their 7 families, the 12 majors, and the language → expert maps.

Expert ids follow the reference code's family order (0 Sino-Tibetan … 6 Niger-Congo) so that checkpoints and
routing plots line up with the paper's. ``mn`` (Mongolian) is spelled ``ne`` in the Apollo-MoE data; the registry
accepts both and always answers with ``mn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FAMILIES: tuple[str, ...] = (
    "Sino-Tibetan",
    "Altaic",
    "Australasian",
    "Austronesian",
    "Indo-European",
    "Afro-Asiatic",
    "Niger-Congo",
)

# code -> (English name, family index). Order inside a family follows the paper's listing.
_TABLE: dict[str, tuple[str, int]] = {
    "zh": ("Chinese", 0),
    "ko": ("Korean", 1), "ja": ("Japanese", 1), "mn": ("Mongolian", 1),
    "th": ("Thai", 2), "vi": ("Vietnamese", 2), "lo": ("Lao", 2),
    "mg": ("Malagasy", 3), "ceb": ("Cebuano", 3), "su": ("Sundanese", 3), "ilo": ("Ilocano", 3), "doi": ("Dogri", 3),
    "en": ("English", 4), "de": ("German", 4), "pt": ("Portuguese", 4), "es": ("Spanish", 4), "fr": ("French", 4),
    "ru": ("Russian", 4), "it": ("Italian", 4), "hr": ("Croatian", 4), "gl": ("Galician", 4), "cs": ("Czech", 4),
    "co": ("Corsican", 4), "la": ("Latin", 4), "uk": ("Ukrainian", 4), "bs": ("Bosnian", 4), "bg": ("Bulgarian", 4),
    "eo": ("Esperanto", 4), "mai": ("Maithili", 4), "sq": ("Albanian", 4), "da": ("Danish", 4), "sa": ("Sanskrit", 4),
    "no": ("Norwegian", 4), "gn": ("Guarani", 4), "sr": ("Serbian", 4), "sk": ("Slovak", 4),
    "gd": ("Scottish Gaelic", 4), "lb": ("Luxembourgish", 4), "hi": ("Hindi", 4),
    "ar": ("Arabic", 5), "ckb": ("Central Kurdish", 5), "mt": ("Maltese", 5), "he": ("Hebrew", 5),
    "ln": ("Lingala", 6), "bm": ("Bambara", 6), "sw": ("Swahili", 6), "nso": ("Northern Sotho", 6),
    "ig": ("Igbo", 6), "rw": ("Kinyarwanda", 6), "ha": ("Hausa", 6),
}

MAJORS: tuple[str, ...] = ("ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru", "zh")
APOLLO_LANGUAGES: tuple[str, ...] = ("en", "zh", "es", "fr", "ar", "hi")
ALIASES: dict[str, str] = {"ne": "mn"}

ExpertAssignment = Literal["family", "language"]


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    family: str
    family_id: int

    @property
    def major(self) -> bool:
        return self.code in MAJORS


class UnknownLanguage(ValueError):
    pass


def canonical(code: str) -> str:
    """Normalise a language code (case, aliases); raise naming the code if it is not one of the 50."""
    c = code.strip().lower().replace("_", "-")
    c = ALIASES.get(c, c)
    if c not in _TABLE:
        raise UnknownLanguage(f"unknown language code {code!r}: expected one of the 50 Apollo-MoE codes "
                              f"({', '.join(sorted(_TABLE))}) or an alias ({', '.join(ALIASES)})")
    return c


def get(code: str) -> Language:
    c = canonical(code)
    name, fam = _TABLE[c]
    return Language(c, name, FAMILIES[fam], fam)


def all_codes() -> tuple[str, ...]:
    return tuple(_TABLE)


def minors() -> tuple[str, ...]:
    return tuple(c for c in _TABLE if c not in MAJORS)


def is_known(code: str) -> bool:
    try:
        canonical(code)
    except UnknownLanguage:
        return False
    return True


def family_members(family: str | int) -> tuple[str, ...]:
    idx = family if isinstance(family, int) else FAMILIES.index(family)
    return tuple(c for c, (_, f) in _TABLE.items() if f == idx)


def expert_map(assignment: ExpertAssignment, languages: tuple[str, ...] | list[str] = MAJORS) -> dict[str, int]:
    """Language code → expert id.

    ``family``: 7 experts, one per family, for all 50 languages (``languages`` is ignored).
    ``language``: one expert per language of ``languages``, in the given order.
    """
    if assignment == "family":
        return {c: f for c, (_, f) in _TABLE.items()}
    if assignment == "language":
        codes = [canonical(c) for c in languages]
        if len(set(codes)) != len(codes):
            raise ValueError(f"duplicate language in {list(languages)}")
        return {c: i for i, c in enumerate(codes)}
    raise ValueError(f"unknown expert assignment {assignment!r}: expected 'family' or 'language'")


def num_experts(assignment: ExpertAssignment, languages: tuple[str, ...] | list[str] = MAJORS) -> int:
    return len(FAMILIES) if assignment == "family" else len(languages)


def expert_names(assignment: ExpertAssignment, languages: tuple[str, ...] | list[str] = MAJORS) -> list[str]:
    return list(FAMILIES) if assignment == "family" else [canonical(c) for c in languages]
