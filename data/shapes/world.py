"""ShapesWorld scene graphs: the vocabulary of the world, the named emblems and `make_scene`.

A scene is a pure function of (split, index, seed, kind): the arguments are hashed into a private
random.Random, never the global RNG, so scenes are reproducible across processes and machines and
the splits are disjoint streams. Geometry lives on a 1000 x 1000 canvas; `render` scales it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from .geometry import drawn_box, text_ink_box, text_width

SPLITS = ("train", "val", "test", "human", "human2", "web")
KINDS = ("natural", "document", "receipt", "chart", "ui")
CANVAS = 1000

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "pentagon", "heart",
          "arrow", "ring"]
# Shape frequency over the world (POPE "popular" negatives are the frequent absent shapes) and themes
# that make some shapes co-occur (POPE "adversarial" negatives are absent co-occurring shapes).
SHAPE_PRIOR = dict(zip(SHAPES, [9, 8, 7, 6, 5, 4, 3, 3, 2, 2, 1]))
THEMES = [["circle", "ring", "hexagon", "pentagon"], ["square", "cross", "diamond", "arrow"],
          ["triangle", "star", "heart", "circle"]]
COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "cyan"]
COLOR_RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 205, 20),
             "orange": (245, 130, 20), "purple": (130, 50, 180), "pink": (240, 110, 180),
             "brown": (130, 80, 40), "black": (25, 25, 25), "cyan": (20, 190, 210),
             "gray": (150, 150, 150), "white": (255, 255, 255)}  # gray / white: UI widgets and glyphs only
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (222, 222, 222), "beige": (240, 228, 200),
               "pale blue": (208, 226, 246), "pale green": (212, 238, 212), "lavender": (232, 222, 246)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": (100, 140), "medium": (160, 215), "large": (240, 320)}  # side of the square box
LABEL_WORDS = ["SALE", "OPEN", "STOP", "EXIT", "HELLO", "GO", "NEW", "PARK", "CAFE", "FREE", "NORTH",
               "SOUTH", "LOTUS", "ZEBRA", "MAPLE", "RIVER", "ORBIT", "PIXEL", "12", "42", "7", "99", "2024"]
WIDGETS = ("button", "toggle", "checkbox")


def _emblem_names(n: int = 128) -> list[str]:
    """Made-up two-syllable proper names ("Varnok"), unique, from a fixed private RNG."""
    rng = random.Random(20240517)
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
              "tr", "th", "sk", "qu", "h", "j"]
    vowels = ["a", "e", "i", "o", "u", "a", "o", "ae", "ei", "y"]
    middles = ["r", "l", "n", "m", "rn", "lm", "nd", "sk", "th", "v", "z", "rk", "st", "lv"]
    ends = ["", "k", "n", "r", "x", "s", "th", "l", "m", "d", "ra", "os", "ith", "a"]
    names: list[str] = []
    while len(names) < n:
        name = (rng.choice(onsets) + rng.choice(vowels) + rng.choice(middles) + rng.choice(vowels[:6])
                + rng.choice(ends)).capitalize()
        if 5 <= len(name) <= 9 and name not in names:
            names.append(name)
    return names


def _emblem_glyphs(n: int = 128) -> list[tuple[tuple[int, ...], ...]]:
    """5x5 left-right symmetric bit patterns, pairwise Hamming distance >= 4 on their free cells."""
    rng = random.Random(7)
    chosen: list[int] = []
    while len(chosen) < n:
        bits = rng.getrandbits(15)  # 5 rows x 3 free columns (cols 3, 4 mirror cols 1, 0)
        if 6 <= bin(bits).count("1") <= 11 and all(bin(bits ^ c).count("1") >= 4 for c in chosen):
            chosen.append(bits)
    glyphs = []
    for bits in chosen:
        rows = []
        for r in range(5):
            left = [(bits >> (3 * r + c)) & 1 for c in range(3)]
            rows.append(tuple(left + left[1::-1]))
        glyphs.append(tuple(rows))
    return glyphs


EMBLEMS = _emblem_names()
EMBLEM_GLYPHS = _emblem_glyphs(len(EMBLEMS))
BADGE_SHAPES = ("circle", "square", "hexagon", "diamond")
assert set(BADGE_SHAPES) <= set(SHAPES)  # a badge is also a shape: POPE and VQA count it as one
# Each emblem always wears the same badge shape and colour, so it is one fixed, learnable picture.
EMBLEM_BADGE = [(BADGE_SHAPES[i % 4], COLORS[(i * 7 + i // 4) % len(COLORS)]) for i in range(len(EMBLEMS))]


def glyph_color(badge_color: str) -> str:
    """Glyph ink on a badge: white on dark badges, black on light ones."""
    return "black" if badge_color in ("yellow", "cyan", "pink", "orange") else "white"


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) canvas units: the layout square the shape is drawn in
    emblem: int | None = None  # index into EMBLEMS: the object is that emblem's badge
    label: str = ""  # UI widget / chart bar label
    state: str = ""  # UI widget state ("on", "off", "checked", "unchecked") or chart bar value

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """The tight box of the drawn shape (a star or an arrow covers less than its layout box):
        what grounding and referring give."""
        return drawn_box(self.shape, self.box)


@dataclass
class TextItem:
    text: str
    box: tuple[int, int, int, int]  # the ink's tight box; the renderer scales the text to fill it
    color: str = "black"

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.box


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[Obj]
    texts: list[TextItem] = field(default_factory=list)
    texture: str = "plain"
    kind: str = "natural"
    uid: str = ""  # "split/index/seed/kind": seeds the text generators of this scene
    meta: dict = field(default_factory=dict)  # kind-specific facts (title, receipt items, chart values, ...)


def rng_for(*parts) -> random.Random:
    """A private RNG seeded by a stable hash of the parts (never Python's salted hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _overlaps(box, boxes, gap=20) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] + gap and b[0] < x2 + gap and y1 < b[3] + gap and b[1] < y2 + gap for b in boxes)


def _place(rng: random.Random, w: int, h: int, taken: list, area=(30, 30, 970, 970), tries=60):
    """A free (x1, y1, x2, y2) of size w x h inside `area`, or None."""
    ax1, ay1, ax2, ay2 = area
    if ax2 - ax1 < w or ay2 - ay1 < h:
        return None
    for _ in range(tries):
        x, y = rng.randint(ax1, ax2 - w), rng.randint(ay1, ay2 - h)
        if not _overlaps((x, y, x + w, y + h), taken):
            return (x, y, x + w, y + h)
    return None


def _pick_shape(rng: random.Random, theme: list[str] | None) -> str:
    if theme and rng.random() < 0.75:
        return rng.choice(theme)
    return rng.choices(SHAPES, weights=[SHAPE_PRIOR[s] for s in SHAPES])[0]


def _natural(rng: random.Random, split: str, area=(30, 30, 970, 970), max_objects=8, taken=None):
    """Objects and a label text for a natural scene: non-overlapping, so every box shows its object."""
    taken = [] if taken is None else taken
    if split == "web":
        n = rng.choice([1, 2, 2, 3, 3, 4, 4, 5])
    else:
        n = rng.choice([1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8])
    n = min(n, max_objects)
    theme = rng.choice(THEMES) if rng.random() < 0.7 else None
    n_emblems = 0
    if rng.random() < (0.8 if split == "web" else 0.3):
        n_emblems = 2 if rng.random() < 0.15 and n >= 2 else 1
    objects: list[Obj] = []
    for i in range(n):
        is_emblem = i < n_emblems
        # emblems are drawn big: their glyph must stay legible at 64 px
        sizes = ["medium", "large", "large", "large"] if is_emblem else ["small", "medium", "medium", "large"]
        size = rng.choice(sizes)
        for size_try in (size, "medium", "small"):
            side = rng.randint(*SIZES[size_try])
            box = _place(rng, side, side, taken, area)
            if box:
                break
        if box is None:
            continue
        taken.append(box)
        if is_emblem:
            emblem = rng.randrange(len(EMBLEMS))
            shape, color = EMBLEM_BADGE[emblem]
            objects.append(Obj(shape, color, size_try, box, emblem=emblem))
        else:
            objects.append(Obj(_pick_shape(rng, theme), rng.choice(COLORS), size_try, box))
    texts = []
    if rng.random() < 0.3:
        word = rng.choice(LABEL_WORDS)
        h = rng.randint(50, 90)
        w = int(text_width(word, h)) + 2
        box = _place(rng, w, h, taken, area)
        if box:
            taken.append(box)
            color = rng.choice(["black", "blue", "red"])
            texts.append(TextItem(word, text_ink_box(word, box[0], box[1], h), color))
    return objects, texts


SENTENCE_SUBJECTS = ["The council", "Our team", "The museum", "A visitor", "The report", "This page",
                     "The market", "The garden club", "Each member", "The archive"]
SENTENCE_VERBS = ["describes", "collects", "counts", "lists", "shows", "compares", "keeps", "sorts"]
SENTENCE_OBJECTS = ["red stars", "blue circles", "old badges", "seven hexagons", "the river maps",
                    "green squares", "the annual budget", "rare emblems", "small diamonds", "yellow rings"]
ITEMS = ["Tea", "Coffee", "Bread", "Apples", "Soup", "Cake", "Milk", "Rice", "Juice", "Pasta", "Eggs",
         "Salad", "Honey", "Cheese"]
CHART_TOPICS = ["Visitors per day", "Stars sold", "Badges found", "Rainfall (mm)", "Points per team",
                "Books read"]
UI_SETTINGS = ["Wi-Fi", "Bluetooth", "Dark mode", "Sound", "Location", "Alerts", "Sync", "Airplane mode"]
UI_BUTTONS = ["Save", "Cancel", "Send", "Delete", "Next", "Back", "Share", "Open", "Close", "Retry"]
UI_SCREENS = ["Settings", "Profile", "Messages", "Downloads", "Privacy", "Display"]


def _text_line(rng, text, x, y, h, taken, color="black"):
    """Text set in a line of height h at (x, y): the line keeps its room in `taken`; the item gets its
    ink box."""
    taken.append((x, y, x + int(text_width(text, h)) + 2, y + h))
    return TextItem(text, text_ink_box(text, x, y, h), color)


def _document(rng: random.Random, split: str):
    title = f"The {rng.choice(EMBLEMS)} {rng.choice(['Report', 'Notes', 'Review', 'Bulletin', 'Guide'])}"
    taken: list = []
    texts = [_text_line(rng, title, 60, 50, 70, taken)]
    # print size varies: fine print (26 units = 12 px at 448) needs the high resolutions MM1.5 studies
    lines, y, h = [], 160, rng.choice([26, 32, 42])
    for _ in range(rng.randint(3, 6)):
        line = (f"{rng.choice(SENTENCE_SUBJECTS)} {rng.choice(SENTENCE_VERBS)} "
                f"{rng.choice(SENTENCE_OBJECTS)}.")
        lines.append(line)
        texts.append(_text_line(rng, line, 60, y, h, taken))
        y += round(h * 1.5)
    objects = []
    if rng.random() < 0.6:  # a figure: a small natural scene in the lower part of the page
        objects, fig_texts = _natural(rng, split, area=(60, y + 30, 940, 900), max_objects=3, taken=taken)
        texts += fig_texts
    page = rng.randint(1, 40)
    texts.append(_text_line(rng, f"Page {page}", 440, 930, 36, taken, "black"))
    return objects, texts, {"title": title, "lines": lines, "page": page}


def _receipt(rng: random.Random):
    store = f"{rng.choice(EMBLEMS)} {rng.choice(['Market', 'Cafe', 'Bakery', 'Store'])}"
    taken: list = []
    texts = [_text_line(rng, store, 120, 50, 64, taken)]
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    texts.append(_text_line(rng, date, 120, 130, 40, taken))
    items, y, total = [], 210, 0
    for name in rng.sample(ITEMS, rng.randint(2, 6)):
        qty, cents = rng.randint(1, 4), rng.randint(50, 990)
        amount = qty * cents
        total += amount
        items.append({"item": name, "qty": qty, "price": f"{cents / 100:.2f}",
                      "amount": f"{amount / 100:.2f}"})
        texts.append(_text_line(rng, f"{qty} x {name}", 120, y, 44, taken))
        amount_text = f"{amount / 100:.2f}"
        texts.append(_text_line(rng, amount_text, 880 - int(text_width(amount_text, 44)), y, 44, taken))
        y += 70
    total_text = f"{total / 100:.2f}"
    texts.append(_text_line(rng, "TOTAL", 120, y + 30, 52, taken))
    texts.append(_text_line(rng, total_text, 880 - int(text_width(total_text, 52)), y + 30, 52, taken))
    meta = {"store": store, "date": date, "items": items, "total": total_text,
            "paper": [90, 30, 910, y + 110]}  # lists: meta stays JSON-native
    return [], texts, meta


def _chart(rng: random.Random):
    title = rng.choice(CHART_TOPICS)
    taken: list = []
    texts = [_text_line(rng, title, 80, 40, 60, taken)]
    n = rng.randint(3, 6)
    categories = rng.sample(ITEMS + EMBLEMS[:20], n)
    values = [rng.randint(1, 20) * 5 for _ in range(n)]
    while len(set(values)) < n:  # distinct values: "which is highest" has one answer
        values = [rng.randint(1, 20) * 5 for _ in range(n)]
    base, top, slot = 830, 200, 760 // n
    objects, color = [], rng.choice(COLORS[:8])
    for i, (cat, val) in enumerate(zip(categories, values)):
        x1 = 150 + i * slot + slot // 6
        x2 = x1 + slot * 2 // 3
        y1 = base - int((base - top) * val / 100)
        objects.append(Obj("bar", color, "", (x1, y1, x2, base), label=cat, state=str(val)))
        h = 32 if len(cat) < 8 else 26
        label_w = int(text_width(cat, h))
        texts.append(_text_line(rng, cat, (x1 + x2) // 2 - label_w // 2, base + 15, h, taken))
        val_w = int(text_width(str(val), 34))
        texts.append(_text_line(rng, str(val), (x1 + x2) // 2 - val_w // 2, y1 - 44, 34, taken))
    meta = {"title": title, "categories": categories, "values": values, "axis": [130, top - 20, 130, base]}
    return objects, texts, meta


def _ui(rng: random.Random):
    screen = rng.choice(UI_SCREENS)
    taken: list = []
    texts = [_text_line(rng, screen, 60, 40, 64, taken, "white")]
    objects, y = [], 170
    for setting in rng.sample(UI_SETTINGS, rng.randint(2, 5)):
        texts.append(_text_line(rng, setting, 60, y + 10, 48, taken))
        if rng.random() < 0.6:
            on = rng.random() < 0.5
            objects.append(Obj("toggle", "green" if on else "gray", "", (780, y, 920, y + 70), label=setting,
                               state="on" if on else "off"))
        else:
            on = rng.random() < 0.5
            objects.append(Obj("checkbox", "blue" if on else "gray", "", (850, y + 5, 910, y + 65),
                               label=setting, state="checked" if on else "unchecked"))
        y += 110
    x = 60
    for name in rng.sample(UI_BUTTONS, rng.randint(1, 3)):
        w = int(text_width(name, 44)) + 80
        color = rng.choice(["blue", "green", "red", "purple"])
        objects.append(Obj("button", color, "", (x, 820, x + w, 910), label=name))
        texts.append(_text_line(rng, name, x + 40, 843, 44, taken, "white"))
        x += w + 40
    return objects, texts, {"screen": screen, "header": [0, 0, 1000, 140]}


def make_scene(split: str, index: int, seed: int = 0, kind: str = "natural") -> Scene:
    """Scene number `index` of `split` (pure function of the arguments; see module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    uid = f"{split}/{index}/{seed}/{kind}"
    return scene_from_rng(rng_for("scene", uid), split, kind, uid)


def scene_from_rng(rng: random.Random, split: str, kind: str, uid: str) -> Scene:
    """The scene drawn from `rng` (used by make_scene and by the multi-scene tasks)."""
    meta: dict = {}
    if kind == "natural":
        objects, texts = _natural(rng, split)
        background, texture = rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES)
    elif kind == "document":
        objects, texts, meta = _document(rng, split)
        background, texture = "white", "plain"
    elif kind == "receipt":
        objects, texts, meta = _receipt(rng)
        background, texture = rng.choice(["light gray", "pale blue", "beige"]), "plain"
    elif kind == "chart":
        objects, texts, meta = _chart(rng)
        background, texture = "white", "plain"
    else:
        objects, texts, meta = _ui(rng)
        background, texture = "white", "plain"
    return Scene(CANVAS, CANVAS, background, objects, texts, texture, kind, uid, meta)
