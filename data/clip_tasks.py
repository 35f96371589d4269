"""The data side of clip_caption.py (arXiv:2410.02740 in miniature): ShapesWorld image sets with their
AltTexts and gold captions in every format, a user's image-text CSV/JSONL read into the same form, gold
synthetic captions at a known error rate, the open_clip export; the tokenization both models share; and what
the evaluations score against: the captioner's CIDEr-D / CHAIR row, the zero-shot classes and their
multi-label truth, GenEval-style targets, the blind baselines, the paired bootstrap over key pairs, and the
report's tables. `cfg` is clip_caption.Config."""
from __future__ import annotations

import csv
import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from data import InputError, shapes
from data.metrics import cider_d, object_scores
from data.shapes.text import area, shapes_of
from data.tokenizer import get_tokenizer

FORMATS = ("ssc", "dsc", "dsc+", "afc")  # captioner formats; CLIP recipes use ssc / dsc / afc
CAPTION_COLUMNS = ("CIDEr-D", "obj P", "obj R", "halluc.", "below blind", "95% CI", "tokens", "names")
# Zero-shot prompt templates (averaged per class, as in CLIP's ImageNet eval).
TEMPLATES = {"emblem": ("{}", "the {} emblem", "a photo of the {} emblem.", "{} logo"),
             "shape": ("a {}.", "a photo of a {}.", "a {} shape on a background."),
             "colour": ("a {} shape.", "a photo of a {} object.", "something {}.")}
CLASSES = {"emblem": shapes.EMBLEMS, "shape": shapes.SHAPES, "colour": shapes.COLORS}
COLUMNS = ("emblem top1", "shape top1", "colour top1", "I->T R@1", "T->I R@1")
POSITIONS = tuple("top left|top|top right|left|center|right|bottom left|bottom|bottom right".split("|"))
GENEVAL = {"colour": shapes.COLORS, "shape": shapes.SHAPES, "count": range(1, 9), "position": POSITIONS,
           "background": list(shapes.BACKGROUNDS)}  # GenEval's four, and the background every DSC names
REQUESTED = {"dense": tuple(GENEVAL), "short": ("colour", "shape")}  # what every DSC / SSC prompt states
GENEVAL_COLUMNS = (*GENEVAL, "attributes", "all requested")


# ----------------------------------------------------------------------------- image sets
@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    alttexts: list[str]
    captions: dict  # fmt -> list[str]: gold captions (ShapesWorld) or the user's caption column
    scenes: list | None = None  # list[shapes.Scene]; None for a user's files

    def __getitem__(self, cut: slice) -> ImageSet:
        return ImageSet(self.images[cut], self.alttexts[cut], {f: c[cut] for f, c in self.captions.items()},
                        self.scenes and self.scenes[cut])


def parse_recipe(name: str) -> tuple[str, float]:
    """(text source, p(synthetic)): 'alt' -> (alt, 0.0); 'ssc30' -> (ssc, 0.3); 'dsc' -> (dsc, 1.0)."""
    match = re.fullmatch(r"(alt|ssc|dsc|afc)(\d{1,3})?", name)
    if not match or int(match.group(2) or 100) > 100:
        raise InputError(f"--recipes: {name!r}: expected alt, ssc<P>, dsc<P> or afc<P> with P in 0..100")
    return match.group(1), 0.0 if match.group(1) == "alt" else int(match.group(2) or 100) / 100


def batch_indices(n: int, batch: int, step: int, seed: int, run) -> torch.Tensor:
    """run.rank's share of batch `step` of endless seeded permutations of range(n), run.world ranks (the
    same on a resume)."""
    positions = range(step * batch, (step + 1) * batch)
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e))
             for e in {p // n for p in positions}}
    return torch.stack([perms[p // n][p % n] for p in positions])[run.rank::run.world]


def drop_prompts(prompts: list[str], coins: torch.Tensor, p: float) -> list[str]:
    """Classifier-free guidance training (Ho & Salimans 2022): the prompt becomes "" where coin < p."""
    return ["" if c < p else text for text, c in zip(prompts, coins.tolist())]


def render_split(split: str, start: int, n: int, cfg, size: int = 0, plain: bool = False) -> ImageSet:
    """Scenes split[start:start+n] with AltTexts and gold captions; plain: no background texture (noise)."""
    scenes = [shapes.make_scene(split, i, seed=cfg.seed) for i in range(start, start + n)]
    scenes = [dataclasses.replace(s, texture="plain") for s in scenes] if plain else scenes
    pixels = np.stack([np.asarray(shapes.render(s, size or cfg.image_size)) for s in scenes])  # (N, S, S, 3)
    captions = {f: [shapes.caption(s, f, seed=start + i) for i, s in enumerate(scenes)] for f in FORMATS}
    alttexts = [shapes.caption(s, "alttext", seed=start + i) for i, s in enumerate(scenes)]
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), alttexts, captions, scenes)


def object_regions(scenes, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The captioner's stage-0 labels, one row per shape object: (scene index (M,), token mask (M, 1 + P)
    of the ViT tokens whose patch its box overlaps (token 0 = CLS, never), (shape id, colour id) (M, 2))."""
    grid, rows = size // patch, []
    for n, scene in enumerate(scenes):
        for o in (o for o in scene.objects if o.shape in shapes.SHAPES):
            x1, x2 = (round(v * size / scene.width) for v in o.box[0::2])  # canvas units -> pixels
            y1, y2 = (round(v * size / scene.height) for v in o.box[1::2])
            mask = torch.zeros(grid, grid)  # (rows, cols) of patches; a box [x1, x2) in pixels
            mask[y1 // patch: -(-y2 // patch), x1 // patch: -(-x2 // patch)] = 1
            rows.append((n, torch.cat([torch.zeros(1), mask.flatten()]),
                         (shapes.SHAPES.index(o.shape), shapes.COLORS.index(o.color))))
    return (torch.tensor([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows]))


def read_user_pairs(path: str, cfg, size: int = 0) -> ImageSet:
    """A user's CSV/JSONL: AltText = `alttext` or else `caption`; `caption` is every format's gold caption."""
    rows = shapes.read_image_text(path)  # InputError naming file:line on bad rows or bytes
    if len(rows) < 10:
        raise InputError(f"{path}: {len(rows)} rows; expected at least 10 image-text pairs")
    pixels = [np.asarray(shapes.load_image(row["filepath"]).resize((size or cfg.image_size,) * 2))
              for row in rows]  # filepath comes back resolved against the file's folder
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    alttexts = [row.get("alttext") or row["caption"] for row in rows]
    return ImageSet(images, alttexts, dict.fromkeys(FORMATS, [row["caption"] for row in rows]))


def gold_synthetic(data: ImageSet, fmts, error: float, seed: int) -> dict:
    """Gold captions per format, a share `error` swapped for another image's (errors at a known rate)."""
    rngs, n = {fmt: random.Random(f"{seed}/{fmt}") for fmt in fmts}, len(data.images)
    return {f: [data.captions[f][(i + rngs[f].randrange(1, n)) % n if rngs[f].random() < error else i]
                for i in range(n)] for f in fmts}


def export(folder: Path, data: ImageSet, synthetic: dict) -> None:
    """folder/captions.csv (filepath,alttext,ssc,dsc,afc) + PNGs: for open_clip, shapes.read_image_text."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(data.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    rows = [[f"{i:06d}.png", data.alttexts[i], *(synthetic[k][i] for k in ("ssc", "dsc", "afc"))]
            for i in range(len(data.images))]
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["filepath", "alttext", "ssc", "dsc", "afc"], *rows])


# ----------------------------------------------------------------------------- tokens
class Texts:
    """Tokenization shared by both models: `<|endoftext|>` ends a text, `<|pad|>` fills batches."""

    def __init__(self):
        enc = self.enc = get_tokenizer()
        self.eot, self.pad, self.alt = map(enc.encode_single_token, ("<|endoftext|>", "<|pad|>", "<|alt|>"))
        self.control = {f: enc.encode_single_token(f"<|{f}|>") for f in FORMATS}
        self.encode = self.enc.encode_ordinary  # user text never produces control tokens

    def clip_batch(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids, each truncated to context_length - 1 tokens + <|endoftext|>; and (B,) lengths."""
        ids = [self.encode(t)[: context_length - 1] + [self.eot] for t in texts]
        return self.pad_right(ids), torch.tensor([len(x) for x in ids])

    def pad_right(self, seqs: list[list[int]], fill: int | None = None) -> torch.Tensor:  # (B, T_max)
        return pad_sequence([torch.tensor(s) for s in seqs], True, self.pad if fill is None else fill)

    def prompt(self, fmt: str, alttext: str, alt_tokens: int) -> list[int]:
        """The captioner's prompt: [<|dsc|>], or for AFC [pads, <|alt|>, alttext, <|afc|>] of fixed length."""
        if fmt != "afc":
            return [self.control[fmt]]
        alt = self.encode(alttext)[:alt_tokens]
        return [self.pad] * (alt_tokens - len(alt)) + [self.alt] + alt + [self.control["afc"]]


# ----------------------------------------------------------------------------- what evaluations score against
def caption_row(generated: list[str], gold: list[str], scenes, texts: Texts, blind=None, resamples=1000):
    """CIDEr-D; CHAIR-style object P / R vs the scene graph (halluc. = 1 - P); mean tokens; emblems named.
    With `blind` captions (one per scene): halluc.(blind) - halluc. and its 95% interval, from resampling the
    scenes (the same ones for both: a paired bootstrap of the two mention-weighted rates)."""
    scores = [object_scores(c, s) for c, s in zip(generated, scenes)]
    mentions = sum(s["mentions"] for s in scores)
    precision = 1 - sum(s["hallucinated"] for s in scores) / mentions if mentions else None
    gap = {}
    if blind is not None and mentions:
        counts = lambda rows: np.array([[r["hallucinated"], r["mentions"]] for r in rows], float)  # (N, 2)
        ours, theirs = counts(scores), counts(object_scores(c, s) for c, s in zip(blind, scenes))
        rate = lambda c, idx: c[idx, 0].sum(-1) / np.maximum(c[idx, 1].sum(-1), 1)  # mention-weighted
        idx = np.random.default_rng(0).integers(0, len(ours), (resamples, len(ours)))  # (resamples, N)
        diffs = rate(theirs, idx) - rate(ours, idx)  # (resamples,)
        gap = {"below blind": float(rate(theirs, np.arange(len(ours))) - rate(ours, np.arange(len(ours)))),
               "95% CI": [round(float(np.percentile(diffs, q)), 3) for q in (2.5, 97.5)]}
    emblems = [(shapes.EMBLEMS[o.emblem].lower(), c.lower()) for c, s in zip(generated, scenes)
               for o in s.objects if o.emblem is not None]
    return {"CIDEr-D": cider_d(generated, [[g] for g in gold])[0], "obj P": precision,
            "obj R": float(np.mean([s["recall"] for s in scores])),
            "halluc.": None if precision is None else 1 - precision, **gap,
            "tokens": float(np.mean([len(texts.encode(c)) for c in generated])),
            "names": float(np.mean([n in c for n, c in emblems])) if emblems else None}


def retrieval_hits(image_emb, text_emb, gallery: int) -> dict[str, np.ndarray]:
    """Per image (image i's query is text i): I->T and T->I R@1 hits within consecutive galleries of `gallery`
    items (a final partial gallery is dropped: NaN). A tie counts against: a constant model scores 0."""
    hits = {"I->T R@1": np.full(len(image_emb), np.nan), "T->I R@1": np.full(len(image_emb), np.nan)}
    for s in range(0, len(image_emb) - gallery + 1, gallery):
        sim = image_emb[s: s + gallery] @ text_emb[s: s + gallery].t()  # (G, G)
        hits["I->T R@1"][s: s + gallery] = ((sim >= sim.diag()[:, None]).sum(1) == 1).numpy()  # own text only
        hits["T->I R@1"][s: s + gallery] = ((sim >= sim.diag()[None, :]).sum(0) == 1).numpy()  # own image
    return hits


def scene_labels(scenes) -> dict:
    """emblem / shape / colour -> (N, K) bool: the classes of each scene's shape objects (multi-label)."""
    labels = {k: torch.zeros(len(scenes), len(v), dtype=torch.bool) for k, v in CLASSES.items()}
    for n, scene in enumerate(scenes):
        for o in (o for o in scene.objects if o.shape in shapes.SHAPES):
            labels["shape"][n, shapes.SHAPES.index(o.shape)] = True
            labels["colour"][n, shapes.COLORS.index(o.color)] = True
            if o.emblem is not None:
                labels["emblem"][n, o.emblem] = True
    return labels


def geneval_targets(scenes) -> dict[str, torch.Tensor]:
    """Class ids a prompt requests: colour, shape, 3x3 position of the largest shape; count; background."""
    mains = [(max(shapes_of(s), key=lambda o: area(o.box)), s) for s in scenes]
    return {"colour": torch.tensor([shapes.COLORS.index(o.color) for o, _ in mains]),
            "shape": torch.tensor([shapes.SHAPES.index(o.shape) for o, _ in mains]),
            "count": torch.tensor([min(len(shapes_of(s)), 8) - 1 for _, s in mains]),
            "position": torch.tensor([POSITIONS.index(shapes.position(o, s)) for o, s in mains]),
            "background": torch.tensor([list(shapes.BACKGROUNDS).index(s.background) for s in scenes])}


def baseline_rows(held_out: ImageSet, train_scenes, gallery: int) -> dict:
    """chance: a random class / ranking; majority: the commonest training class (retrieval has none)."""
    chance = {c: 1 / min(gallery, len(held_out.images)) for c in COLUMNS if "R@" in c}
    majority, train = {}, scene_labels(train_scenes)
    for name, present in scene_labels(held_out.scenes).items():
        present = present[present.any(1)]
        chance[f"{name} top1"] = (present.sum(1) / present.shape[1]).mean().item()
        majority[f"{name} top1"] = present[:, train[name].sum(0).argmax()].float().mean().item()
    return {"chance": chance, "majority": dict.fromkeys(COLUMNS) | majority}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int, seed: int) -> tuple[float, float, float]:
    """Mean a - b over the items scored in both; 95% interval from resampling the same items for both."""
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    idx = np.random.default_rng(seed).integers(0, len(a), (n, len(a)))  # (n, items)
    diffs = (a[idx] - b[idx]).mean(1)
    return float(a.mean() - b.mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def key_pair_verdicts(hits: dict, pairs: tuple, resamples: int) -> list[dict]:
    """Paired bootstrap per seed for each (a, b, metric) that ran; a verdict only if every interval agrees."""
    out = []  # retrieval: per image, the mean of its I->T and T->I R@1 hits
    per_item = lambda h, metric: (h["I->T R@1"] + h["T->I R@1"]) / 2 if metric == "retrieval" else h[metric]
    for a, b, metric in pairs:
        seeds = sorted(s for r, s in hits if r == a and (b, s) in hits)
        runs = [[round(x, 4) for x in paired_bootstrap(per_item(hits[a, s], metric),
                                                       per_item(hits[b, s], metric), resamples, s)]
                for s in seeds]
        verdict = "yes" if all(r[1] > 0 for r in runs) else "no (reversed)" if all(r[2] < 0 for r in runs) \
            else "not resolved"
        out += [{"claim": f"{a} beats {b} on {metric}", "seeds": seeds, "verdict": verdict,
                 "diff": [r[0] for r in runs], "ci95": [r[1:] for r in runs]}] if seeds else []
    return out


# ----------------------------------------------------------------------------- report
def markdown_table(first: str, rows: dict, columns) -> str:
    """{row name: {column: value}} -> a markdown table; None prints as "-"."""
    fmt = lambda v: "-" if v is None else f"{v:.{3 if abs(v) < 10 else 1}f}" if type(v) is float else str(v)
    return "\n".join([f"| {first} | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)] + [
        f"| {name} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for name, row in rows.items()])


def report(cfg, metrics: dict) -> str:
    """report.md: the captioner, CLIP, key-pair, text-to-image and diffusion key-pair tables, timings."""
    pair_columns = ("seeds", "diff", "ci95", "verdict")
    pairs = lambda key: {p["claim"]: {c: p[c] for c in pair_columns} for p in metrics[key]}
    text = [f"# clip_caption.py ({cfg.preset} preset, --synthetic={cfg.synthetic}); arXiv:2410.02740\n",
            f"## Captioner ({cfg.n_cap_eval} held-out test scenes, greedy; blind = the gold caption of "
            "another scene; below blind = halluc. (blind) - halluc., 95% CI: paired bootstrap of scenes)\n",
            markdown_table("format", metrics["captioner"] or {}, CAPTION_COLUMNS),
            f"\n## CLIP per caption recipe ({cfg.n_eval} held-out web images, galleries of {cfg.gallery})\n",
            markdown_table("recipe", metrics["clip"], COLUMNS),
            f"\n## Key pairs (fixed in advance; paired bootstrap, {cfg.bootstrap} resamples)\n",
            markdown_table("claim (a beats b)", pairs("key_pairs"), pair_columns),
            f"\n## Text-to-image per caption recipe ({cfg.n_diff_eval} held-out web prompts, dense = DSC, "
            "short = SSC; probe accuracy; samples: diffusion_samples.png)\n",
            markdown_table("model (prompts)", metrics["diffusion"], GENEVAL_COLUMNS),
            "\n## Diffusion key pairs (share of requested attributes right, per prompt; paired bootstrap)\n",
            markdown_table("claim (a beats b)", pairs("diffusion_key_pairs"), pair_columns),
            "\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["timings_s"].items())]
    return "\n".join(text)
