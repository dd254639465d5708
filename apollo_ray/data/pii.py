"""PII scrubbing (collect): personal data in dialogue and web text becomes a typed placeholder before anything trains.

What is found, and by what:
- ``<EMAIL>`` addresses; ``<IP>`` IPv4/IPv6 addresses (candidates checked by the standard ``ipaddress`` module).
- ``<PHONE>`` numbers, by Google's libphonenumber (the ``phonenumbers`` package): numbers written with a ``+`` country
  code anywhere, national formats for the countries of the document's language (``PHONE_REGIONS``), ``VALID``
  leniency, so a dosage, a year range or a lab value is not a phone number.
- ``<ID>`` national identity numbers of the major languages' countries (``ID_RULES``): each candidate must pass its
  check-digit and structure rules in ``python-stdnum`` (US SSN, UK NHS, China resident id, Spain DNI/NIE, Mexico CURP,
  France NIR, India Aadhaar/PAN, Germany IdNr, Italy codice fiscale, Brazil CPF, Portugal CC, Korea RRN, Japan My
  Number, Russia INN, Saudi id by Luhn); the Egyptian national id has no check digit and is matched by its structure.
  Which rules run depends on the document's language: a Chinese mobile number is not read as a German tax id.
- ``<MRN>`` medical record / patient numbers after a keyword in the 12 major languages ("MRN:", "N° de dossier",
  "病历号", "رقم الملف الطبي", ...); the keyword stays.
- ``<DOB>`` a full date after a birth keyword ("born on", "né le", "出生日期", "जन्म तिथि", ...) or right after a titled
  name ("Mrs. Jane Doe (12/03/1985)"); a bare year or an unrelated date stays: it is not personal.
- ``<URL>`` only URLs with a personal path (a profile on a social site, ``/users/<name>``, ``~name``, ``@name``, an
  e-mail or a user id in the query): a link to a guideline is content, not PII.
- ``<NAME>`` person names need a NER model, which cannot be downloaded at run time: with ``hygiene.pii.ner_model``
  naming an installed spaCy pipeline (the ``ner`` extra) its PER/PERSON entities are replaced; without one names stay
  and the log says so once per process.

Overlapping findings: the longest span wins, then the more specific type (``PRIORITY``). A text with no finding is
returned as the very same string, byte for byte.

Why not presidio-analyzer or scrubadub: presidio imports spaCy in every worker (2 s, ~100 MB), its e-mail check fetches
the public suffix list from the network on first use (offline it logs a traceback), its URL recognizer marks pieces of
e-mail addresses, and its ids cover few of our languages' countries; scrubadub brings scikit-learn and textblob, whose
name detection needs corpora downloads. Both rest on the two libraries used here for the hard parts (phone numbers,
check digits); the remaining patterns are the keyword contexts that no library has for 12 languages.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import regex

from apollo_ray.config import PII_TYPES, PIIConfig

log = logging.getLogger(__name__)

PLACEHOLDER = {t: f"<{t}>" for t in PII_TYPES}
# On equal spans: the type found with more context wins (a keyword or a check digit over a bare number pattern).
PRIORITY = {t: i for i, t in enumerate(("URL", "EMAIL", "MRN", "DOB", "ID", "IP", "PHONE", "NAME"))}

# national formats of phone numbers are read for these countries, by the document's language; others only with +CC
PHONE_REGIONS: dict[str, tuple[str, ...]] = {
    "en": ("US", "GB", "IN"), "zh": ("CN", "TW", "HK"), "es": ("ES", "MX", "AR"), "fr": ("FR", "BE", "CA"),
    "ar": ("SA", "EG", "AE"), "hi": ("IN",), "de": ("DE", "AT", "CH"), "ru": ("RU",), "it": ("IT",),
    "pt": ("BR", "PT"), "ja": ("JP",), "ko": ("KR",),
}
DEFAULT_PHONE_REGIONS = ("US", "GB", "IN", "CN", "FR", "DE")  # a document of no known language
# phonenumbers is slow on long texts; it only runs where a digit run could be a phone number at all
_PHONE_GATE = regex.compile(r"\d[\d\s().\-/]{4,}\d")

# Boundaries against digits and Latin letters only: in Chinese or Japanese an id or a date touches the characters around
# it ("身份证号11010519491231002X，"), which are letters too.
_LEFT = r"(?<![\p{N}\p{Latin}_])"
_RIGHT = r"(?![\p{N}\p{Latin}_])"


# ---------------------------------------------------------------------------------------------------- national ids
def _stdnum(module: str) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        import importlib

        return bool(importlib.import_module(f"stdnum.{module}").is_valid(value))
    return check


def _luhn(value: str) -> bool:
    from stdnum import luhn

    return luhn.is_valid(regex.sub(r"\D", "", value))


def _eg_national_id(value: str) -> bool:
    # century digit 2/3, then a real YYMMDD and a governorate code 01-35 or 88: the structure is the only check
    d = regex.sub(r"\D", "", value)
    mm, dd, gov = int(d[3:5]), int(d[5:7]), int(d[7:9])
    return len(d) == 14 and 1 <= mm <= 12 and 1 <= dd <= 31 and (1 <= gov <= 35 or gov == 88)


@dataclass(frozen=True)
class IdRule:
    name: str
    pattern: Any  # compiled regex of a candidate
    valid: Callable[[str], bool]


def _rule(name: str, pattern: str, valid: Callable[[str], bool], flags: int = 0) -> IdRule:
    return IdRule(name, regex.compile(_LEFT + pattern + _RIGHT, flags), valid)


ID_RULES: dict[str, IdRule] = {r.name: r for r in (
    _rule("us_ssn", r"\d{3}-\d{2}-\d{4}", _stdnum("us.ssn")),
    _rule("gb_nhs", r"\d{3}[ -]\d{3}[ -]\d{4}", _stdnum("gb.nhs")),
    _rule("cn_ric", r"\d{17}[\dXx]", _stdnum("cn.ric")),
    _rule("es_dni", r"\d{8}-?[A-Za-z]", _stdnum("es.dni")),
    _rule("es_nie", r"[XYZxyz]-?\d{7}-?[A-Za-z]", _stdnum("es.nie")),
    _rule("mx_curp", r"[A-Z]{4}\d{6}[HM][A-Z]{5}[A-Z\d]\d", _stdnum("mx.curp")),
    _rule("fr_nir", r"[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}", _stdnum("fr.nir")),
    _rule("in_aadhaar", r"[2-9]\d{3}[ -]?\d{4}[ -]?\d{4}", _stdnum("in_.aadhaar")),
    _rule("in_pan", r"[A-Z]{5}\d{4}[A-Z]", _stdnum("in_.pan")),
    _rule("de_idnr", r"\d{2} ?\d{3} ?\d{3} ?\d{3}", _stdnum("de.idnr")),
    _rule("it_cf", r"[A-Za-z]{6}\d{2}[A-Za-z]\d{2}[A-Za-z]\d{3}[A-Za-z]", _stdnum("it.codicefiscale")),
    _rule("br_cpf", r"\d{3}\.?\d{3}\.?\d{3}-?\d{2}", _stdnum("br.cpf")),
    _rule("pt_cc", r"\d{8} ?\d ?[A-Z]{2}\d", _stdnum("pt.cc")),
    _rule("kr_rrn", r"\d{6}-?[1-8]\d{6}", _stdnum("kr.rrn")),
    _rule("jp_my_number", r"\d{4}[ -]?\d{4}[ -]?\d{4}", _stdnum("jp.in_")),
    _rule("ru_inn", r"\d{12}", _stdnum("ru.inn")),
    _rule("sa_id", r"[12]\d{9}", _luhn),
    _rule("eg_id", r"[23]\d{13}", _eg_national_id),
)}
# the countries whose ids a document in this language is likely to hold; a language not listed gets every rule
ID_RULES_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": ("us_ssn", "gb_nhs", "in_aadhaar", "in_pan"), "hi": ("in_aadhaar", "in_pan"), "zh": ("cn_ric",),
    "es": ("es_dni", "es_nie", "mx_curp"), "fr": ("fr_nir",), "ar": ("sa_id", "eg_id"), "de": ("de_idnr",),
    "ru": ("ru_inn",), "it": ("it_cf",), "pt": ("br_cpf", "pt_cc"), "ja": ("jp_my_number",), "ko": ("kr_rrn",),
}

# ------------------------------------------------------------------------------------------------ keyword contexts
_MRN_KEYWORDS = (
    r"MRN|medical record (?:number|no\.?|#)|patient (?:ID|number|no\.?)|hospital (?:number|no\.?)"
    r"|chart (?:number|no\.?)|num[ée]ro de dossier(?: m[ée]dical)?|n[°º] de dossier|N[°º] IPP|IPP"
    r"|n[úu]mero de historia(?: cl[íi]nica)?|historia cl[íi]nica(?: n[°ºo]\.?)?|NHC"
    r"|Patientennummer|Patienten-ID|Fallnummer|numero di cartella(?: clinica)?|cartella clinica(?: n\.?)?"
    r"|n[úu]mero do prontu[áa]rio|prontu[áa]rio(?: n[°º]\.?)?|номер (?:медицинской )?карты|медкарта"
    r"|№ истории болезни|病历号|病案号|住院号|门诊号|病歷號|カルテ番号|患者ID|診察券番号|병록번호|환자번호|등록번호"
    r"|رقم الملف الطبي|رقم الملف|رقم المريض|मेडिकल रिकॉर्ड (?:नंबर|संख्या)|एमआरएन|रोगी (?:संख्या|आईडी)")
_MRN = regex.compile(r"(?:" + _MRN_KEYWORDS + r")\s*[:：#№.\-]?\s*(?:n[°º]\s*)?"
                     r"(?P<v>(?=[A-Za-z\d\-/]*\d{3})[A-Za-z\d][A-Za-z\d\-/]{3,19})" + _RIGHT, regex.IGNORECASE)

_MONTHS = (
    r"january|february|march|april|may|june|july|august|september|october|november|december"
    r"|janvier|février|fevrier|mars|avril|mai|juin|juillet|août|aout|septembre|octobre|novembre|décembre|decembre"
    r"|enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|setiembre|octubre|noviembre|diciembre"
    r"|januar|jänner|februar|märz|april|mai|juni|juli|august|september|oktober|november|dezember"
    r"|gennaio|febbraio|marzo|aprile|maggio|giugno|luglio|agosto|settembre|ottobre|novembre|dicembre"
    r"|janeiro|fevereiro|março|marco|abril|maio|junho|julho|agosto|setembro|outubro|novembro|dezembro"
    r"|января|февраля|марта|апреля|мая|июня|июля|августа|сентября|октября|ноября|декабря"
    r"|يناير|فبراير|مارس|أبريل|ابريل|مايو|يونيو|يوليو|أغسطس|اغسطس|سبتمبر|أكتوبر|اكتوبر|نوفمبر|ديسمبر"
    r"|जनवरी|फ़रवरी|फरवरी|मार्च|अप्रैल|मई|जून|जुलाई|अगस्त|सितंबर|सितम्बर|अक्टूबर|नवंबर|नवम्बर|दिसंबर|दिसम्बर")
_DATE = (
    r"(?:\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})|\d{4}[./-]\d{1,2}[./-]\d{1,2}"
    r"|\d{4}\s*年\s*\d{1,2}\s*月\s*\d{1,2}\s*日|\d{4}\s*년\s*\d{1,2}\s*월\s*\d{1,2}\s*일"
    r"|\d{1,2}\.?\s*(?:de\s+)?(?:" + _MONTHS + r")\.?,?\s*(?:de\s+)?\d{4}(?:\s*г(?:ода|\.))?"
    r"|(?:" + _MONTHS + r")\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4})")
_DOB_KEYWORDS = (
    r"date of birth|birth ?date|d\.?o\.?b\.?|born(?: on)?|née?(?: le)?|date de naissance"
    r"|fecha de nacimiento|f\. ?nac\.|nacid[oa](?: el)?|geburtsdatum|geb\.|geboren(?: am)?|data di nascita"
    r"|nat[oa](?: il)?|data de nascimento|nascid[oa](?: em)?|дата рождения|родил(?:ся|ась)|д\.\s?р\."
    r"|出生日期|出生年月日|出生于|出生於|生年月日|誕生日|생년월일|تاريخ الميلاد|تاريخ الولادة|مواليد|ولدت? في"
    r"|जन्म ?तिथि|जन्म की तारीख|जन्म दिनांक")
_DOB = regex.compile(_LEFT + r"(?:" + _DOB_KEYWORDS + r")\s*[:：,\-]?\s*(?:on|le|el|am|il|em|в|于|於|في)?\s*"
                     r"(?P<v>" + _DATE + r")" + _RIGHT, regex.IGNORECASE)
# "Mrs. Jane Doe (12/03/1985)", "Herr Max Müller, 01.02.1970": a date right after a titled name is a birth date
_TITLED_NAME_DATE = regex.compile(
    r"(?<![\p{L}])(?:Mr|Mrs|Ms|Miss|Dr|Mme|Mlle|M|Herr|Frau|Sr|Sra|Srta|Sig|Sig\.ra|Dona|Dom|г-н|г-жа)\.?\s+"
    r"\p{Lu}[\p{L}'\-]+(?:\s+\p{Lu}[\p{L}'\-]+){0,2}\s*[,(]\s*(?P<v>" + _DATE + r")" + _RIGHT)

# ---------------------------------------------------------------------------------------------- e-mail, URL, IP
# ASCII addresses: in unspaced scripts a wider class would swallow the words around an address ("邮箱jane@x.com的")
_EMAIL = regex.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
                       + _RIGHT)
_URL = regex.compile(r"(?:https?://|www\.)[^\s<>\"'`）】」』，。、]+", regex.IGNORECASE)
_URL_TRAILING = ".,;:!?)]}'\""
_PERSONAL_HOSTS = ("facebook.com", "fb.com", "instagram.com", "twitter.com", "x.com", "linkedin.com", "tiktok.com",
                   "vk.com", "ok.ru", "weibo.com", "t.me", "wa.me", "line.me", "pinterest.com", "github.com",
                   "threads.net", "snapchat.com", "xiaohongshu.com", "douyin.com")
_PERSONAL_PATH = regex.compile(r"/(?:~[^/?#]+|@[^/?#]+|(?:user|users|u|profile|profiles|people|person|member|members"
                               r"|patient|patients|account|accounts|in|pub|home)/[^/?#]+)", regex.IGNORECASE)
_PERSONAL_QUERY = regex.compile(r"[?&](?:e-?mail|mail|user(?:name|id)?|uid|login|patient(?:id)?|name|phone|tel|mrn)=",
                                regex.IGNORECASE)
_IPV4 = regex.compile(r"(?<!\d)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")  # a sentence's full stop may follow
_IPV6 = regex.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    type: str


def _personal_url(url: str) -> bool:
    low = url.lower()
    host_path = low.split("://", 1)[-1]
    host, _, rest = host_path.partition("/")
    host = host.split("@")[-1].split(":")[0].removeprefix("www.")
    if "@" in host_path.split("/", 1)[-1] and _EMAIL.search(url):
        return True
    if any(host == h or host.endswith("." + h) for h in _PERSONAL_HOSTS) and rest.strip("/"):
        return True
    return bool(_PERSONAL_PATH.search("/" + rest) or _PERSONAL_QUERY.search(url))


class Scrubber:
    """Finds and replaces PII in one text; built once per worker process (``worker_scrubber``)."""

    def __init__(self, types: Iterable[str] = PII_TYPES, ner_model: str | None = None):
        self.types = frozenset(types)
        self.ner = load_ner(ner_model) if "NAME" in self.types else None

    # -- finding ---------------------------------------------------------------------------------------------
    def find(self, text: str, language: str | None = None) -> list[Finding]:
        """Non-overlapping findings, in text order."""
        found: list[Finding] = []
        t = self.types
        if "URL" in t:
            for m in _URL.finditer(text):
                url = m.group().rstrip(_URL_TRAILING)
                if _personal_url(url):
                    found.append(Finding(m.start(), m.start() + len(url), "URL"))
        if "EMAIL" in t:
            found += [Finding(m.start(), m.end(), "EMAIL") for m in _EMAIL.finditer(text)]
        if "MRN" in t:
            found += [Finding(m.start("v"), m.end("v"), "MRN") for m in _MRN.finditer(text)]
        if "DOB" in t:
            for pattern in (_DOB, _TITLED_NAME_DATE):
                found += [Finding(m.start("v"), m.end("v"), "DOB") for m in pattern.finditer(text)]
        if "ID" in t:
            found += self._ids(text, language)
        if "IP" in t:
            found += self._ips(text)
        if "PHONE" in t and _PHONE_GATE.search(text):
            found += self._phones(text, language)
        if self.ner is not None:
            found += [Finding(s, e, "NAME") for s, e in self.ner(text)]
        return _resolve(found)

    def _ids(self, text: str, language: str | None) -> list[Finding]:
        names = ID_RULES_BY_LANGUAGE.get(language or "", tuple(ID_RULES))
        out = []
        for name in names:
            rule = ID_RULES[name]
            for m in rule.pattern.finditer(text):
                try:
                    ok = rule.valid(m.group())
                except Exception:  # a validator that cannot read a candidate: not an id
                    ok = False
                if ok:
                    out.append(Finding(m.start(), m.end(), "ID"))
        return out

    @staticmethod
    def _ips(text: str) -> list[Finding]:
        out = []
        for pattern in (_IPV4, _IPV6):
            for m in pattern.finditer(text):
                candidate = m.group()
                if pattern is _IPV6 and (candidate.count(":") < 2 or not regex.search(r"[0-9A-Fa-f]", candidate)):
                    continue
                try:
                    ipaddress.ip_address(candidate)
                except ValueError:
                    continue
                out.append(Finding(m.start(), m.end(), "IP"))
        return out

    @staticmethod
    def _phones(text: str, language: str | None) -> list[Finding]:
        import phonenumbers

        regions = PHONE_REGIONS.get(language or "", DEFAULT_PHONE_REGIONS)
        out: dict[tuple[int, int], Finding] = {}
        for region in regions:  # +CC numbers are found whatever the region; national ones only for their country
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                out.setdefault((m.start, m.end), Finding(m.start, m.end, "PHONE"))
        return list(out.values())

    # -- replacing -------------------------------------------------------------------------------------------
    def scrub(self, text: str, language: str | None = None) -> tuple[str, Counter]:
        """(text with each finding replaced by its placeholder, count per type); the same string when none."""
        findings = self.find(text, language)
        if not findings:
            return text, Counter()
        parts, at = [], 0
        for f in findings:
            parts += [text[at:f.start], PLACEHOLDER[f.type]]
            at = f.end
        parts.append(text[at:])
        return "".join(parts), Counter(f.type for f in findings)

    def scrub_json(self, record: str, language: str | None = None) -> tuple[str, Counter]:
        """Every string value of a JSON record (keys stay); re-serialised as collect writes ``fields`` only when
        something was replaced."""
        counts: Counter = Counter()

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                new, c = self.scrub(v, language)
                counts.update(c)
                return new
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v

        obj = walk(json.loads(record))
        if not counts:
            return record, counts
        return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str), counts


def _resolve(found: list[Finding]) -> list[Finding]:
    """Longest first, then by PRIORITY; a finding overlapping one already kept is dropped."""
    kept: list[Finding] = []
    for f in sorted(found, key=lambda f: (-(f.end - f.start), PRIORITY[f.type], f.start)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


# ---------------------------------------------------------------------------------------------------------- NER
NER_LABELS = frozenset({"PER", "PERSON"})


def load_ner(model: str | None) -> Callable[[str], list[tuple[int, int]]] | None:
    """A spaCy pipeline's person spans, or None (and one log line saying names stay) when there is none to use."""
    from apollo_ray.runtime import setup_logging

    setup_logging()  # built first thing in a Ray worker, whose root logger has no handler yet: the line would be lost
    if not model:
        log.info("pii: person names are not scrubbed: no NER model (set hygiene.pii.ner_model to an installed spaCy "
                 "pipeline; `pip install apollo-ray[ner]`)")
        return None
    try:
        import spacy
    except ImportError:
        log.warning("pii: hygiene.pii.ner_model=%r but spaCy is not installed (`pip install apollo-ray[ner]`): person "
                    "names are not scrubbed", model)
        return None
    try:
        nlp = spacy.load(model)
    except OSError as e:
        log.warning("pii: cannot load the NER model %r (%s): person names are not scrubbed", model, e)
        return None
    log.info("pii: person names scrubbed with the NER model %r", model)

    def persons(text: str) -> list[tuple[int, int]]:
        return [(e.start_char, e.end_char) for e in nlp(text).ents if e.label_ in NER_LABELS]
    return persons


@functools.lru_cache(maxsize=4)
def worker_scrubber(types: tuple[str, ...], ner_model: str | None) -> Scrubber:
    """The scrubber of this worker process for one config, built on first use (the NER model loads once)."""
    return Scrubber(types, ner_model)


def scrubber_for(pcfg: PIIConfig) -> Scrubber | None:
    return worker_scrubber(tuple(pcfg.types), pcfg.ner_model) if pcfg.enabled else None


def semantic_config(pcfg: PIIConfig) -> dict[str, Any] | None:
    """What changes the corpus (collect's fingerprint): None when scrubbing is off, so that folders stay as before."""
    return pcfg.model_dump(mode="json") if pcfg.enabled else None
