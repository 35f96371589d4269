"""The image-text data and the evaluation protocol of mm1.py, shared with the scripts that continue from its
checkpoint: ShapesWorld captions, VQA, interleaved documents and text passages rendered and tokenised once,
a user's LLaVA JSON or image-text CSV/JSONL read into the same form, packing into training rows; k-shot
captioning and VQA with batched generation, the vision probe, text perplexity, and the blind baselines.

A document is (ids, images): int32 token ids with ONE `<image>` marker per image, and the indices of its
images in a shared uint8 image bank. Packing expands each marker to `image_tokens` copies, the slots the
connector's outputs are written into, so one pre-rendered pool serves every connector / token count."""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import InputError, shapes
from data.metrics import cider_d, words
from data.tokenizer import RANKS_PATH, SPECIAL_TOKENS


def tokenizer_sha256() -> str:
    """sha256 of the bundled BPE ranks file plus the special-token list: the ids a checkpoint expects."""
    return hashlib.sha256(RANKS_PATH.read_bytes() + "\n".join(SPECIAL_TOKENS).encode()).hexdigest()


def vqa_parts(question: str, image, answer: str = "") -> list:
    """VQA in one format for training and evaluation: "Question: .. <image> Answer: ..", an eval prompt ends
    at "Answer:". The question comes first so that an image at the start of a document always begins a
    caption (the 0-shot captioning prompt is the image alone)."""
    return [f"Question: {question}", image, " Answer:" + (f" {answer}" if answer else "")]


def mix_weights(mix: str) -> np.ndarray:
    """--mix "caption:interleaved:text" shares -> sampling weights that sum to 1."""
    parts = mix.split(":")
    if len(parts) != 3 or not all(re.fullmatch(r"\d+\.?\d*", x) for x in parts) or not any(map(float, parts)):
        raise InputError(f"--mix={mix}: expected caption:interleaved:text shares, like 45:45:10")
    return np.array([float(x) for x in parts]) / sum(map(float, parts))


class Pools:
    """Pre-rendered training and evaluation data, built once per process (ablation rows share it). `cfg` has
    mm1.Config's data fields: seed, image_size, caption_formats, vqa_per_scene, n_caption_scenes,
    n_documents, n_passages, eval_scenes, n_eval_passages, train_data, image_folder."""

    def __init__(self, cfg, enc):
        self.enc, self.size = enc, cfg.image_size
        self.image_id, self.eot_id, self.pad_id = (enc.encode_single_token(s) for s in
                                                   ("<image>", "<|endoftext|>", "<|pad|>"))
        self.bank = []  # uint8 (3, S, S) images
        self.answers = {}  # training VQA: question -> Counter of answers (the majority baseline)
        self.passages = [self.doc([shapes.text_passage("train", i, seed=cfg.seed)])
                         for i in range(cfg.n_passages)]
        self.captions, user_text = [], []  # captions: per scene, its documents (caption formats, VQA)
        if cfg.train_data:
            self.captions, user_text = self.read_user_file(cfg.train_data, cfg.image_folder or None)
        # stage 0's CLIP pairs: each built-in scene's SSC caption whatever --caption_formats says, so the rows
        # of the caption-format grid share one encoder, as MM1's ablations share CLIP (user data: its first)
        self.clip_pairs = [group[0] for group in self.captions]
        self.clip_scenes = []  # built-in pairs' scenes (stage 0's object labels); none for user data
        # the gpu preset pre-renders 60k scenes (minutes on one core): a bar on a terminal, none in logs
        for i in tqdm(range(0 if cfg.train_data else cfg.n_caption_scenes), "render scenes", disable=None):
            self.clip_scenes.append(scene := shapes.make_scene("train", i, seed=cfg.seed))
            img = self.add_image(shapes.render(scene, size=self.size))
            group = [self.doc([img, shapes.caption(scene, f, seed=i)]) for f in cfg.caption_formats]
            self.clip_pairs.append(group[0] if cfg.caption_formats[0] == "ssc" else
                                   self.doc([img, shapes.caption(scene, "ssc", seed=i)]))
            for question, answer in shapes.vqa(scene, seed=i)[: cfg.vqa_per_scene]:
                group.append(self.doc(vqa_parts(question, img, answer)))
                self.answers.setdefault(question, Counter())[answer] += 1
            self.captions.append(group)
        self.user_text_items = len(user_text)  # text-only items of a user's LLaVA file train as text
        self.passages += user_text
        self.documents = [self.doc(shapes.interleaved_document("train", i, seed=cfg.seed))
                          for i in tqdm(range(cfg.n_documents), "render documents", disable=None)]
        self.caption_docs = [d for group in self.captions for d in group]
        # stage 0b's "world text": passages and the caption stream's words without their images
        self.lm_texts = self.passages + [(ids[ids != self.image_id], []) for ids, _ in self.caption_docs]
        # held out: test-split scenes (the first 16 also probe the vision path during training);
        # few-shot demonstrations come from the training split
        self.eval_items = [self.eval_item("test", i, cfg.seed) for i in range(max(cfg.eval_scenes, 16))]
        self.shot_items = [self.eval_item("train", i, cfg.seed) for i in range(16)]
        # text perplexity on test passages, split by whether the same text is among the training passages
        seen = {tuple(ids) for ids, _ in self.passages}
        test = [self.doc([shapes.text_passage("test", i, seed=cfg.seed)])[0]
                for i in range(cfg.n_eval_passages)]
        self.eval_passages = {"seen": [x for x in test if tuple(x) in seen],
                              "unseen": [x for x in test if tuple(x) not in seen]}

    def majority_answer(self, question: str) -> str:
        """The blind VQA baseline: the most frequent training answer to the same question (else overall)."""
        counts = self.answers.get(question) or sum(self.answers.values(), Counter())
        return counts.most_common(1)[0][0] if counts else ""

    def add_image(self, pil) -> int:
        pil = pil.convert("RGB").resize((self.size, self.size))
        self.bank.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))  # (3, S, S) uint8
        return len(self.bank) - 1

    def doc(self, parts):
        """Parts (str | Scene | bank index) in reading order -> (ids, one marker per image; image indices)."""
        ids, images = [], []
        for part in parts:
            if isinstance(part, str):
                ids += self.enc.encode_ordinary(part)
            else:
                is_index = isinstance(part, int)
                images.append(part if is_index else self.add_image(shapes.render(part, self.size)))
                ids.append(self.image_id)
        return np.array(ids + [self.eot_id], dtype=np.int32), images

    def eval_item(self, split: str, i: int, seed: int) -> dict:
        scene = shapes.make_scene(split, i, seed=seed)
        refs = list(dict.fromkeys(shapes.caption(scene, "ssc", seed=s) for s in range(5)))  # 5 wordings
        return dict(image=self.add_image(shapes.render(scene, size=self.size)), refs=refs, scene=scene,
                    vqa=shapes.vqa(scene, seed=i)[0])

    def read_user_file(self, path: str, image_folder):
        """A user's LLaVA JSON or image-text CSV/JSONL -> (caption-stream groups, text-only documents).
        A LLaVA conversation becomes one text, turns joined by spaces, each `<image>` replaced by its image;
        text-only items (as in llava_v1_5_mix665k) train as text."""
        if not path.endswith(".json"):
            rows = shapes.read_image_text(path, image_folder)
            return [[self.doc([self.add_image(shapes.load_image(r["filepath"])), r["caption"]])]
                    for r in rows], []
        groups, text_only = [], []
        for item in shapes.read_llava_json(path, image_folder):
            pieces = " ".join(turn["value"].strip() for turn in item["conversations"]).split("<image>")
            parts = [pieces[0]]  # the reader checked: one marker per image
            for image_path, piece in zip(item["images"], pieces[1:]):
                parts += [self.add_image(shapes.load_image(image_path)), piece]
            (groups if item["images"] else text_only).append(self.doc([p for p in parts if p != ""]))
        if not groups:
            raise InputError(f"{path}: no item with an image (MM1's caption stream needs image-text pairs)")
        return [[doc] for doc in groups], text_only


def pack_sequence(rng, docs, seq_len: int, image_id: int, pad_id: int, image_tokens: int):
    """Fill one sequence with whole documents of one source; the last one is cut, never inside an image.
    Returns ids (T,), the image-bank indices, and the document index of every position (T,) (-1: padding)."""
    ids, doc_of, images, n = np.full(seq_len, pad_id), np.full(seq_len, -1), [], 0
    while n < seq_len:
        doc_ids, doc_images = docs[rng.integers(len(docs))]
        x = np.repeat(doc_ids, np.where(doc_ids == image_id, image_tokens, 1))  # marker -> image_tokens slots
        cut = len(x) > seq_len - n
        if cut:
            x = x[: seq_len - n]
            x = x[: len(x) - int((x == image_id).sum()) % image_tokens]  # drop a half-written image
        ids[n: n + len(x)], doc_of[n: n + len(x)] = x, doc_of.max() + 1
        images += doc_images[: int((x == image_id).sum()) // image_tokens]
        n += len(x)
        if cut:
            break
    return ids, images, doc_of


def get_batch(pools: Pools, cfg, step: int, sources, weights, stream: int = 0):
    """The global batch of `step`: a pure function of (seed, stream, step), so resume and DDP need no data
    state. Each sequence draws its source by `weights`. Returns ids (B, T), targets (B, T) with -100 on
    image slots / padding, each row's image-bank indices, the document index of each position (B, T), and
    the target count of the whole global batch (every rank's loss normaliser)."""
    rng = np.random.default_rng([cfg.seed, stream, step])
    rows = [pack_sequence(rng, sources[rng.choice(len(sources), p=weights)], cfg.seq_len, pools.image_id,
                          pools.pad_id, cfg.image_tokens) for _ in range(cfg.batch_size)]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, T)
    targets = torch.cat([ids[:, 1:], torch.full((len(ids), 1), pools.pad_id)], 1)  # (B, T) next token
    targets[(targets == pools.image_id) | (targets == pools.pad_id)] = -100
    doc_of = torch.from_numpy(np.stack([r[2] for r in rows]))  # (B, T)
    return ids, targets, [r[1] for r in rows], doc_of, int((targets != -100).sum())


def doc_attention(doc_of):
    """Packed rows: positions restart at every document, and a token sees only earlier tokens of its own
    document. doc_of (B, T) -> positions (B, T), mask (B, 1, T, T) bool (padding, -1, sees only itself)."""
    T, dev = doc_of.shape[1], doc_of.device
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mask = (doc_of[:, :, None] == doc_of[:, None, :]) & causal & (doc_of[:, :, None] >= 0)  # (B, T, T)
    mask |= torch.eye(T, dtype=torch.bool, device=dev)
    index = torch.arange(T, device=dev).expand_as(doc_of)
    starts = torch.cat([torch.ones_like(doc_of[:, :1]), (doc_of[:, 1:] != doc_of[:, :-1]).long()], 1)
    first = torch.cummax(torch.where(starts.bool(), index, 0), 1).values  # (B, T): where each document starts
    return index - first, mask[:, None]


def constant_caption(pools: Pools, seed: int) -> str:
    """The blind baseline: the training caption that best matches other training captions (CIDEr-D over 300
    of them; candidates: the 50 most frequent short ones). One caption for every test image."""
    texts = [" ".join(words(pools.enc.decode(ids[(ids != pools.image_id) & (ids != pools.eot_id)].tolist())))
             for ids, _ in pools.caption_docs]
    short = [t for t in texts if len(t.split()) <= 20 and not t.startswith("question")] or texts
    refs = [[t] for t in np.random.default_rng(seed).choice(short, min(300, len(short)), replace=False)]
    candidates = [t for t, _ in Counter(short).most_common(50)]
    return max(candidates, key=lambda c: cider_d([c] * len(refs), refs)[0])


def main_object_named(caption: str, scene) -> bool:
    """The largest object's colour and shape are named together in the caption ('a red star')."""
    main = max(scene.objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
    return (main.color, main.shape) in shapes.object_mentions(caption)


def _nll_sum(logits, targets):
    """Summed next-token cross-entropy in fp32; -100 targets are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def prompt(pools, parts, image_tokens):
    """Parts (bank index = image, str = text, None = end of text) -> ids (list) and images (list)."""
    ids, images = [], []
    for part in parts:
        if part is None:
            ids.append(pools.eot_id)
        elif isinstance(part, int):
            ids += [pools.image_id] * image_tokens
            images.append(pools.bank[part])
        else:
            ids += pools.enc.encode_ordinary(part)
    return ids, images


@torch.no_grad()
def generate(model, prompts, images, max_new_tokens: int, stop_id: int, pad_id: int):
    """Greedy continuations of a batch of prompts (lists of ids), left-padded to one length, with a KV
    cache; images (N, 3, S, S) in reading order over the batch. Returns the new ids of each prompt."""
    B, T, dev = len(prompts), max(len(p) for p in prompts), model.lm_head.weight.device
    n_pad = torch.tensor([T - len(p) for p in prompts], device=dev)  # (B,)
    ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=dev)  # (B, T)
    index = torch.arange(T, device=dev)
    positions = (index - n_pad[:, None]).clamp(min=0)  # (B, T): every prompt starts at position 0
    keys = index >= n_pad[:, None]  # (B, T): real tokens, the keys a query may see
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mask = (keys[:, None, :] & causal) | torch.eye(T, dtype=torch.bool, device=dev)  # (B, T, T)
    cache = [[] for _ in model.model.layers]
    logits, _ = model(ids, images, positions, mask[:, None], cache)
    out, done = [[] for _ in prompts], torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        nxt = logits[:, -1].float().argmax(-1)  # (B,)
        done |= nxt == stop_id
        if done.all():
            break
        for b in (~done).nonzero()[:, 0].tolist():
            out[b].append(int(nxt[b]))
        keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)  # (B, T + step + 1)
        logits, _ = model(nxt[:, None], None, positions[:, -1:] + step + 1, keys[:, None, None, :], cache)
    return out


def generate_texts(model, pools, cfg, prompts, max_new_tokens, device) -> list[str]:
    """Greedy completions of prompts (lists of parts), eval_batch at a time, left-padded."""
    texts = []
    for lo in range(0, len(prompts), 16):
        built = [prompt(pools, parts, cfg.image_tokens) for parts in prompts[lo: lo + 16]]
        images = torch.stack([im for _, ims in built for im in ims]).to(device)
        out = generate(model, [ids for ids, _ in built], images, max_new_tokens, pools.eot_id, pools.pad_id)
        texts += [pools.enc.decode(ids).strip() for ids in out]
    return texts

@torch.no_grad()
def vision_probe(model, pools, cfg, device) -> dict:
    """Does the model look at the image? image_gain: caption NLL per token with a wrong image (the next
    test scene's) minus with the right one, on 16 test scenes. connector_image_share: the share of the
    connector output's variance that lies between images (0: the same tokens for every image)."""
    was_training, items = model.training, pools.eval_items[:16]
    model.eval()
    nll = []
    for shift in (0, 1):  # right images, then wrong ones
        rows = [prompt(pools, [items[(i + shift) % len(items)]["image"], item["refs"][0], None],
                       cfg.image_tokens) for i, item in enumerate(items)]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([ids + [pools.pad_id] * (T - len(ids)) for ids, _ in rows], device=device)  # N, T
        targets = ids[:, 1:].masked_fill((ids[:, 1:] == pools.image_id) | (ids[:, 1:] == pools.pad_id), -100)
        images = torch.stack([im for _, ims in rows for im in ims]).to(device)
        nll.append(_nll_sum(model(ids[:, :-1], images)[0], targets).item() / int((targets != -100).sum()))
    emb = model.image_embeddings(images).float()  # (N, K, C)
    share = emb.var(0).mean() / emb.flatten(0, 1).var(0).mean().clamp_min(1e-12)
    model.train(was_training)
    return dict(image_gain=round(nll[1] - nll[0], 4), connector_image_share=round(share.item(), 4))

@torch.no_grad()
def evaluate(model, pools, cfg, device):
    """k-shot captioning (CIDEr, distinct captions, main object named) and VQA exact match on held-out test
    scenes, k training-split (image, answer) demonstrations before the query (as in MM1); baselines; the
    vision probe; text perplexity on test passages seen / unseen in training."""
    model.eval()
    items, metrics = pools.eval_items[: cfg.eval_scenes], {}
    refs = [item["refs"] for item in items]
    for k in cfg.shots:
        demos = [[pools.shot_items[j] for j in np.random.default_rng([cfg.seed, i]).permutation(16)[:k]]
                 for i in range(len(items))]  # the 4 shots are the first 4 of the 8
        # demonstrations follow each other inside one document, as images do in interleaved documents: with
        # document masks in training, nothing ever attends across an end-of-text token
        caption_prompts, vqa_prompts = [], []  # parts: bank index = image, str = text
        for ds, item in zip(demos, items):
            caption_prompts.append([p for d in ds for p in (d["image"], d["refs"][0] + "\n")]
                                   + [item["image"]])
            shots = [p for d in ds for p in (*vqa_parts(d["vqa"][0], d["image"], d["vqa"][1]), ".\n")]
            vqa_prompts.append(shots + vqa_parts(item["vqa"][0], item["image"]))
        captions = generate_texts(model, pools, cfg, caption_prompts, cfg.max_new_tokens, device)
        answers = generate_texts(model, pools, cfg, vqa_prompts, 8, device)
        exact = [words(a) == words(item["vqa"][1]) for a, item in zip(answers, items)]
        metrics[f"caption_cider_{k}shot"] = round(100 * cider_d(captions, refs)[0], 2)  # x100 as papers print
        metrics[f"distinct_captions_{k}shot"] = len(set(captions))  # 1: the same caption for every image
        metrics[f"main_object_named_{k}shot"] = round(100 * np.mean([main_object_named(c, item["scene"])
                                                                     for c, item in zip(captions, items)]), 1)
        metrics[f"vqa_exact_match_{k}shot"] = round(100 * np.mean(exact), 2)
        metrics[f"average_{k}shot"] = round((metrics[f"caption_cider_{k}shot"]
                                             + metrics[f"vqa_exact_match_{k}shot"]) / 2, 2)
        metrics.setdefault("samples", [f"{it['refs'][0]!r} -> {c!r}" for it, c in zip(items[:4], captions)])
    constant = constant_caption(pools, cfg.seed)
    metrics["constant_caption_cider"] = round(100 * cider_d([constant] * len(refs), refs)[0], 2)
    majority = [pools.majority_answer(item["vqa"][0]) for item in items]
    metrics["vqa_majority_baseline"] = round(100 * np.mean([words(m) == words(item["vqa"][1])
                                                            for m, item in zip(majority, items)]), 2)
    metrics.update(vision_probe(model, pools, cfg, device))
    for split, passages in pools.eval_passages.items():
        nll, count = 0.0, 0
        for ids in passages:
            x = torch.tensor(ids[: cfg.seq_len + 1], dtype=torch.long, device=device)[None]
            nll += _nll_sum(model(x[:, :-1])[0], x[:, 1:]).item()
            count += x.shape[1] - 1
        metrics[f"text_ppl_{split}"] = round(math.exp(nll / count), 3) if count else None
        metrics[f"text_passages_{split}"] = len(passages)
    model.train()
    return metrics


def results_table(m: dict, cfg) -> str:
    """The table of one run's evaluate() metrics: k-shot rows, the blind baselines, perplexity, image gain."""
    lines = ["| shots | caption CIDEr | distinct captions | main object named (%) | VQA exact match (%) "
             "| average |", "| --- " * 6 + "|"]
    lines += [f"| {k} | {m[f'caption_cider_{k}shot']:.1f} | {m[f'distinct_captions_{k}shot']} / "
              f"{cfg.eval_scenes} | {m[f'main_object_named_{k}shot']:.1f} | "
              f"{m[f'vqa_exact_match_{k}shot']:.1f} | {m[f'average_{k}shot']:.1f} |" for k in cfg.shots]
    return "\n".join(lines + [
        f"\nbaselines: constant caption CIDEr {m['constant_caption_cider']:.1f}; VQA majority answer "
        f"{m['vqa_majority_baseline']:.1f}%",
        f"text perplexity: unseen passages {m['text_ppl_unseen']} ({m['text_passages_unseen']}), seen in "
        f"training {m['text_ppl_seen']} ({m['text_passages_seen']})",
        f"image gain (caption NLL, wrong image - right image): {m['image_gain']:.3f} nats/token; connector "
        f"variance between images: {m['connector_image_share']:.3f}"])


def grid_table(cfg, rows: list, done: list, write=None) -> tuple[str, dict]:
    """An ablation grid's table from the rows run so far, done = [(job index, row label, metrics)]: mean ± sd
    over seeds; a row with image gain < 0.05 is marked "vision unused". write(out_dir, files) stores it as
    ablate_<grid>.md / .json. Returns (table, results by label)."""
    columns = {f"{k}-shot": f"average_{k}shot" for k in cfg.shots} | {
        "distinct 0-shot captions": "distinct_captions_0shot", "text ppl (unseen)": "text_ppl_unseen",
        "image gain": "image_gain", "images / step": "images_per_step", "minutes": "minutes"}
    results = {row: [m for _, label, m in sorted(done) if label == row] for row in rows}
    lines = [f"| {cfg.ablate} | {' | '.join(columns)} | verdict |", "|---" * (len(columns) + 2) + "|"]
    for name, runs in ((n, r) for n, r in results.items() if r):
        cells = [[r[key] for r in runs if r.get(key) is not None] for key in columns.values()]
        cells = [f"{np.mean(c):.3g} ± {np.std(c, ddof=1) if len(c) > 1 else 0:.2g}" for c in cells]
        unused = np.mean([r["image_gain"] for r in runs]) < 0.05
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'vision unused' if unused else ''} |")
    head = (f"seeds {cfg.ablation_seeds}, {cfg.steps} steps, {cfg.eval_scenes} test scenes; k-shot: "
            "mean of caption CIDEr and VQA exact match, as MM1 averages")
    table = "\n".join([head, "", *lines, ""])
    if write:
        write(cfg.out_dir, {f"ablate_{cfg.ablate}.md": table, f"ablate_{cfg.ablate}.json": results})
    return table, results
