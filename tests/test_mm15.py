"""mm15.py: one tiling plan for pixels and `<image>` slots (MM1.5's rule, overview, indicators), the two
other selectors, boxes through every resize / pad / tile and the 0-999 text, the mixture resolver, the
missing --init message. The smoke run from an mm1 checkpoint is in tests/test_chain.py."""
import dataclasses
import json
import os
import random
import socket
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import mm1
import mm15
from data import InputError, shapes
from data import tile_selectors as selectors
from data.shapes import mm15_tasks as tasks
from data.shapes.mm15_tasks import box_to_text, text_to_box
from data.tokenizer import get_tokenizer
from data.vl_tasks import tokenizer_sha256

R, K = 32, 4  # tile side, tokens per tile


def cfg(**kw):
    return dataclasses.replace(mm15.Config(), tile_size=R, image_tokens=K, **kw)


def random_sizes(n=150):
    rng = random.Random(0)
    sizes = [(R, R), (R * 3, R * 3), (1, 1), (1, 5 * R), (5 * R, 1), (3, 7), (2000, 3), (R + 1, R - 1)]
    return sizes + [(rng.randint(1, 8 * R), rng.randint(1, 8 * R)) for _ in range(n)]


@pytest.mark.parametrize("n_min,n_max", [(1, 1), (1, 6), (4, 6), (4, 9)])
def test_plan_properties_and_one_count_for_pixels_and_slots(n_min, n_max):
    for overview in ("after", "before", "none"):
        for indicators in ("none", "index", "seps"):
            c = cfg(n_min=n_min, n_max=n_max, overview=overview, indicators=indicators)
            for w, h in random_sizes(40):
                plan = mm15.plan_tiles(w, h, c)
                rows, cols = plan["grid"]
                assert n_min <= rows * cols <= n_max
                (rw, rh), (left, top) = plan["resized"], plan["pad"]
                assert 0 <= left and 0 <= top and left + rw <= cols * R and top + rh <= rows * R
                # the image touches two opposite sides of its grid (aspect-kept resize, no extra shrink)
                assert rw >= cols * R - 1 or rh >= rows * R - 1
                tiles = mm15.tile_pixels(Image.new("RGB", (w, h), (9, 9, 9)), plan)
                slots = mm15.slot_ids(plan, c, 7, lambda s: [1] * len(s))
                assert tiles.shape == (len(plan["order"]), 3, R, R) and tiles.dtype == torch.uint8
                assert slots.count(7) == len(tiles) * K == plan["n_image_tokens"]


def test_mm15_rule_least_padding_then_least_loss_ties_to_fewer_tiles():
    one = mm15.plan_tiles(R, R, cfg(n_min=1, n_max=9))
    assert one["grid"] == (1, 1) and one["order"] == [("tile", 0, 0)] and one["n_image_tokens"] == K
    assert mm15.plan_tiles(2 * R, R, cfg(n_min=1, n_max=9))["grid"] == (1, 2)  # 2x4 fits too: fewer tiles
    assert mm15.plan_tiles(R, 3 * R, cfg(n_min=1, n_max=9))["grid"] == (3, 1)
    # too large for every grid: least resolution loss (the largest scale), then fewer tiles
    assert mm15.plan_tiles(20 * R, 20 * R, cfg(n_min=1, n_max=6))["grid"] == (2, 2)
    assert mm15.plan_tiles(R, R, cfg(n_min=4, n_max=6))["grid"] == (2, 2)  # upscaled into 4 tiles, no pad
    assert mm15.plan_tiles(5 * R, 5 * R, cfg(split=False))["grid"] == (1, 1)


def test_overview_position_and_indicators():
    for overview, where in (("after", -1), ("before", 0)):
        plan = mm15.plan_tiles(2 * R, 2 * R, cfg(n_min=4, overview=overview))
        assert plan["order"][where] == ("overview", 0, 0) and len(plan["order"]) == 5
    assert ("overview", 0, 0) not in mm15.plan_tiles(2 * R, 2 * R, cfg(n_min=4, overview="none"))["order"]
    plan = mm15.plan_tiles(2 * R, R, cfg(n_min=1))
    seen = []
    mm15.slot_ids(plan, cfg(n_min=1, indicators="seps"), 7, lambda s: seen.append(s) or [1])
    assert seen == [",", "\n"]  # one row of two tiles; the overview has no separator
    seen.clear()
    mm15.slot_ids(plan, cfg(n_min=1, indicators="index"), 7, lambda s: seen.append(s) or [1])
    assert seen == [" r1c1:", " r1c2:", " overview:"]


def test_pixels_follow_the_plan_order():
    """Left half red, right half blue: a 1x2 grid's first tile is red, the second blue."""
    image = Image.new("RGB", (2 * R, R), (0, 0, 255))
    ImageDraw.Draw(image).rectangle((0, 0, R - 1, R - 1), fill=(255, 0, 0))
    plan = mm15.plan_tiles(2 * R, R, cfg(n_min=1))
    tiles = mm15.tile_pixels(image, plan)
    assert tiles[0, 0].float().mean() > 250 and tiles[1, 2].float().mean() > 250 and len(tiles) == 3


def test_box_text_convention_and_round_trip():
    assert box_to_text([0, 0, 999.9, 1000], 1000, 1000) == "[0, 0, 999, 999]"  # floor, clipped
    assert box_to_text([50, 25, 100, 49.9], 200, 50) == "[250, 500, 500, 998]"
    rng = random.Random(1)
    for w, h in random_sizes(100):
        x1, y1 = rng.uniform(0, w * 0.9), rng.uniform(0, h * 0.9)
        box = [x1, y1, rng.uniform(x1, w), rng.uniform(y1, h)]
        back = text_to_box("it is at " + box_to_text(box, w, h), w, h)
        assert all(abs(a - b) <= max(w, h) / 1000 for a, b in zip(box, back))
        for n_min, n_max in ((1, 6), (4, 9)):
            plan = mm15.plan_tiles(w, h, cfg(n_min=n_min, n_max=n_max))
            for overview in (False, True):
                canvas = mm15.box_to_canvas(box, plan, overview)
                assert np.allclose(mm15.box_to_canvas(canvas, plan, overview, inverse=True), box)
            canvas = mm15.box_to_canvas(box, plan)
            pieces = mm15.box_in_tiles(canvas, plan)
            joined = [min(p[0] + plan["order"][i][2] * R for i, p in pieces.items()),
                      min(p[1] + plan["order"][i][1] * R for i, p in pieces.items()),
                      max(p[2] + plan["order"][i][2] * R for i, p in pieces.items()),
                      max(p[3] + plan["order"][i][1] * R for i, p in pieces.items())]
            assert not pieces or np.allclose(joined, canvas)
    assert text_to_box("no box here", 10, 10) is None


def test_transformed_boxes_land_on_the_drawn_pixels():
    """A red box drawn on a 150 x 70 image: in every tile and in the overview, the red pixels are where the
    transformed box says (to 1.5 px: bilinear edges)."""
    w, h, box = 150, 70, [40, 10, 95, 60]
    image = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
    plan = mm15.plan_tiles(w, h, cfg(n_min=4, n_max=9))
    tiles = mm15.tile_pixels(image, plan).permute(0, 2, 3, 1).numpy().astype(int)  # (n, R, R, 3)
    expected = mm15.box_in_tiles(mm15.box_to_canvas(box, plan), plan)
    over = plan["order"].index(("overview", 0, 0))
    expected[over] = mm15.box_to_canvas(box, plan, overview=True)
    assert len(expected) >= 3
    for n, tile in enumerate(tiles):
        red = (tile[..., 0] > 200) & (tile[..., 1] < 100)
        if n not in expected:
            assert red.sum() == 0
            continue
        ys, xs = red.nonzero()
        got = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert np.allclose(got, expected[n], atol=1.5), (n, got, expected[n])


def test_selectors_follow_their_published_rules():
    c = cfg(n_min=1, n_max=6)
    assert selectors.internvl_grid(2 * R, R, c) == (1, 2) and selectors.internvl_grid(R, R, c) == (1, 1)
    assert selectors.internvl_grid(4 * R, 4 * R, c) == (2, 2)  # 1:1 ties: the larger grid for a large image
    assert selectors.llava_next_grid(R, R, c) == (1, 1) and selectors.llava_next_grid(3 * R, R, c) == (1, 3)
    table = selectors.selector_table(c, mm15.plan_tiles, mm15.fit)
    assert table.count("\n| ") == 12 and "| 32 x 32 | 1x1 | 4 | 0 | 1x1 | 8 |" in table


def test_resolver_reproduces_the_papers_shares():
    ratios = dict(general=1, text_rich=3.3, refer_ground=2, science=0.1, math=0.5, code=0.2)
    shares = tasks.resolve_mixture(ratios, dict(single=0.8, multi_image=0.1, text_only=0.1))
    paper = dict(text_rich=37.2, refer_ground=22.5, general=11.3, math=5.6, code=2.3, science=1.1,
                 multi_image=10.0, text_only=10.0)
    assert {k: round(100 * v, 1) for k, v in shares.items()} == paper
    assert abs(sum(shares.values()) - 1) < 1e-9
    with pytest.raises(InputError, match="no counterpart"):
        mm15.mixture(cfg(mix_ratios="general=1,code=0.2"))
    with pytest.raises(InputError, match="mix_groups"):
        mm15.mixture(cfg(mix_groups="single=0.8,multi_image"))


def test_grounding_score_parses_or_counts_a_failure():
    item = dict(pil=[Image.new("RGB", (200, 100))], box=[20, 10, 80, 60], question="q", answer="<box>")
    gold = mm15.item_texts(item)[1]
    assert gold == "[100, 100, 400, 600]"
    assert tasks.score(gold, item, "grounding") is True
    assert tasks.score("[0, 0, 50, 50]", item, "grounding") is False
    assert tasks.score("somewhere left", item, "grounding") is None


def test_missing_init_names_the_command(tmp_path, monkeypatch, capsys):
    argv = ["mm15.py", "--preset=smoke", f"--out_dir={tmp_path}/out", f"--init={tmp_path}/none.safetensors"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        mm15.run_main(mm15.main)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "python mm1.py" in err and "--init=PATH" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_images_at_their_real_shapes_and_boxes_on_the_drawn_pixels():
    """Each kind keeps its aspect ratio; a stretched render puts an object where box_px says (to 2 px;
    mutation check: box_px without its y scale fails here)."""
    rng = random.Random(0)
    for kind, aspect in tasks.ASPECT.items():
        for _ in range(5):
            w, h = tasks.native_size(kind, rng, 64)
            assert abs(w / h - aspect) < 0.05 * aspect + 1 / min(w, h) and max(w, h) >= 48
    checked = 0
    for i in range(20):
        scene = shapes.make_scene("train", i)
        colors = [o.color for o in scene.objects]
        for obj in scene.objects:
            if colors.count(obj.color) > 1 or obj.emblem is not None or obj.shape not in ("square", "circle",
                                                                                          "cross", "hexagon"):
                continue  # one object of its colour, with no thin tip that blurs away when squeezed
            for w, h in ((150, 70), (60, 200)):
                pixels = np.asarray(tasks.render_shaped(scene, w, h)).astype(int)
                assert pixels.shape == (h, w, 3)
                close = np.abs(pixels - np.array(shapes.COLOR_RGB[obj.color])).sum(-1) < 30
                ys, xs = close.nonzero()
                got = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert np.allclose(got, tasks.box_px(obj.bbox, scene, w, h), atol=2), (i, obj, got)
                checked += 1
    assert checked >= 10


def test_task_items_are_deterministic_and_complete():
    for category in tasks.CATEGORIES:
        a, b = tasks.task_item(category, "train", 3, 0, 64), tasks.task_item(category, "train", 3, 0, 64)
        assert a["question"] == b["question"] and a["answer"] == b["answer"] and a["answer"]
        assert (a["images"] == []) == (category == "text_only")
        assert len(a["images"]) == dict(multi_image=2, text_only=0, video=tasks.VIDEO_FRAMES).get(category, 1)
    boxes = [tasks.task_item("refer_ground", "test", i, 0, 64) for i in range(20)]
    assert {item["task"] for item in boxes} == {"grounding", "referring"}
    for item in boxes:
        _, w, h = item["images"][0]
        x1, y1, x2, y2 = item["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def bare_data():
    """mm15.Data's tokenizer side without the pre-rendered pools (sample() needs only these)."""
    data = mm15.Data.__new__(mm15.Data)
    data.enc = get_tokenizer()
    data.image_id, data.eot_id = (data.enc.encode_single_token(t) for t in ("<image>", "<|endoftext|>"))
    return data


def test_box_digits_are_one_token_each_and_decode_back():
    data, rng = bare_data(), random.Random(0)
    for _ in range(50):
        box = [rng.randint(0, 999) for _ in range(4)]
        text = f"Where? At [{box[0]}, {box[1]}, {box[2]}, {box[3]}] I think."
        ids = tasks.encode_text(data.enc, text)
        assert data.enc.decode(ids) == text
        pieces = [data.enc.decode([i]) for i in ids]
        inside = pieces[pieces.index(" [") + 1:pieces.index("]")]  # the box: digits, one per token, and ","
        assert "".join(inside) == ", ".join(map(str, box)) and all(len(p.strip()) == 1 for p in inside)
    assert tasks.encode_text(data.enc, "no box 123 here") == data.enc.encode_ordinary("no box 123 here")


def write_llava(tmp_path, conversations):
    Image.new("RGB", (120, 60), (200, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "sft.json").write_text(json.dumps(conversations, indent=1))
    return tmp_path / "sft.json"


def test_sft_data_reads_llava_json_with_boxes_in_the_text(tmp_path):
    path = write_llava(tmp_path, [
        {"id": "g", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhere is the red square? Give its box."},
            {"from": "gpt", "value": "[10, 20, 500, 998]"},
            {"from": "human", "value": "What is at [0, 0, 999, 999]?"},
            {"from": "gpt", "value": "a red square"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]}])
    items = tasks.llava_sft_items(path)
    assert [(it["question"], it["answer"], len(it["pil"])) for it in items] == [
        ("Where is the red square? Give its box.", "[10, 20, 500, 998]", 1),
        ("What is at [0, 0, 999, 999]?", "a red square", 1), ("2 + 2?", "4", 0)]
    assert items[0]["pil"][0].size == (120, 60)
    data, c = bare_data(), cfg(n_min=2, n_max=4)
    ids, n_prompt, tiles = data.sample(items[0], c)
    assert data.enc.decode(ids[n_prompt:-1]) == " [10, 20, 500, 998]" and len(ids[n_prompt:-1]) == 15
    assert len(tiles) == len(mm15.plan_tiles(120, 60, c)["order"])
    assert ids.count(data.image_id) == len(tiles) * K
    assert data.sample(items[2], c)[2] is None


@pytest.mark.parametrize("turns,match", [
    ([("human", "<image> Where?"), ("gpt", "[10, 20, 5, 30]")], r"sft.json:2: item x: box \[10, 20, 5, 30\]"),
    ([("human", "<image> Where?"), ("gpt", "[1, 2, 3, 1000]")], r"sft.json:2: item x: box .*<= 999"),
    ([("gpt", "<image> hi"), ("human", "hello")], r"sft.json:2: item x: expected human and gpt"),
    ([("human", "Where?"), ("gpt", "here")], r"1 image\(s\) but 0 '<image>' marker"),
])
def test_sft_data_bad_input_is_one_line_naming_the_item(tmp_path, turns, match):
    path = write_llava(tmp_path, [{"id": "x", "image": "a.png",
                                   "conversations": [{"from": f, "value": v} for f, v in turns]}])
    with pytest.raises(InputError, match=match) as err:
        tasks.llava_sft_items(path)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A tiny random mm1-style checkpoint (arch metadata, this tokenizer), so mm15 runs without mm1.py."""
    enc = get_tokenizer()
    arch = dict(vision=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                            patch_size=8),
                connector=dict(type="avgpool", image_tokens=4),
                text=dict(vocab_size=enc.n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e4,
                          moe_every=0, num_experts=2, num_experts_per_tok=1),
                image_token_id=enc.encode_single_token("<image>"), image_size=16,
                pixel_mean=[0.5] * 3, pixel_std=[0.25] * 3)
    path = tmp_path_factory.mktemp("init") / "model.safetensors"
    weights = {k: v.contiguous() for k, v in mm15.MM1(arch).state_dict().items()}
    save_file(weights, str(path), metadata=dict(arch=json.dumps(arch), tokenizer_sha256=tokenizer_sha256(),
                                                image_token_id=str(arch["image_token_id"]), image_size="16"))
    return path


def test_ablation_runs_each_variant_per_seed_and_reuses_finished_runs(tiny_init, tmp_path, monkeypatch):
    argv = ["--preset=smoke", f"--init={tiny_init}", f"--out_dir={tmp_path}", "--ablate=split",
            "--ablation_seeds=0,1", "--cpt_steps=1", "--sft_steps=1", "--eval_items=1", "--max_new_tokens=2"]
    means = mm15.main(argv)
    assert list(means) == ["off", "on"] and len(means["on"]) == len(tasks.EVAL_TASKS) + 2
    for folder in ("base_seed0", "base_seed1", "off_seed0", "off_seed1"):
        assert (tmp_path / folder / "metrics.json").is_file()
    assert json.loads((tmp_path / "off_seed1" / "config.json").read_text())["split"] is False
    table = (tmp_path / "ablation_split.md").read_text()
    assert table.count("\n") == 4 and " ± " in table
    monkeypatch.setattr(mm15, "run", lambda cfg: pytest.fail(f"finished run {cfg.out_dir} run again"))
    assert mm15.main(argv) == means
    mixture = mm15.variants(cfg(ablate="mixture"))
    assert len(mixture) == 1 + len(tasks.CATEGORIES) - 2 + 3 and mixture["paper shares"] == {}  # video, ui: 0
    groups = "single=0.8,multi_image=0.1,text_only=0.1,video=0"
    video = mm15.variants(cfg(ablate="mixture", mix_groups=groups))
    assert "no video" not in video and video.keys() == mixture.keys()  # a category already at 0 is no variant
    shares = {name: mm15.mixture(cfg(**over)) for name, over in mixture.items()}
    assert shares["no general"]["general"] == 0 and shares["no text_only"]["text_only"] == 0
    assert shares["multi_image x2"]["multi_image"] == pytest.approx(0.2 / 1.1)
    assert all(abs(sum(s.values()) - 1) < 1e-9 for s in shares.values())


def test_boxes_png_draws_gold_and_valid_predictions_and_skips_inverted_ones(tmp_path):
    """A parsed prediction with x2 < x1 (a miss) must not crash the picture (it did at the cpu preset)."""
    items = [dict(pil=[Image.new("RGB", (40, 30), "white")], box=[5, 5, 20, 20]) for _ in range(3)]
    tasks.boxes_png(items, [[30, 2, 10, 25], None, [22, 3, 38, 28]], tmp_path / "g.png", scale=1)
    sheet = np.asarray(Image.open(tmp_path / "g.png")).astype(int)
    green, red = (sheet == (0, 200, 0)).all(-1), (sheet == (230, 0, 0)).all(-1)
    assert green[:, :40].any() and green[:, 44:84].any() and green[:, 88:].any()
    assert not red[:, :88].any() and red[:, 88:].any()  # only the third item's box is drawn


def test_describe_items_answer_dpo_bdhs_chair_prompt_and_are_held_out():
    from data.shapes import preferences
    enc = get_tokenizer()
    train = [tasks.task_item("describe", "train", i, 0, 64) for i in range(30)]
    test = [tasks.task_item("describe", "test", i, 0, 64) for i in range(30)]
    for item in train + test:
        scene, w, h = item["images"][0]
        assert item["question"] == preferences.PROMPT_DESCRIBE == "Describe the image."
        assert scene.kind == "natural" and w == h  # square, as dpo_bdhs renders its CHAIR scenes
        gold = " ".join(preferences.object_sentence(o, scene) for o in preferences.described(scene))
        assert item["answer"] == gold and tasks.score(gold, item, "describe")
        absent = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES
                  if (c, s) not in {(o.color, o.shape) for o in scene.objects}][0]
        assert not tasks.score(gold + f" A {absent[0]} {absent[1]} is on the left.", item, "describe")
        assert not tasks.score("I do not know.", item, "describe")  # names nothing: a miss
    objects = lambda items: {repr(item["images"][0][0].objects) for item in items}
    assert not objects(train) & objects(test)  # no eval scene is a training scene
    pools = tasks.ItemPools(seed=0, tile=64, n_cpt=1, n_train=2, n_eval=3)
    assert [it["question"] for it in pools.test["describe"]] == ["Describe the image."] * 3
    ids, n_prompt, _ = mm15.Data.sample(bare_data(), pools.test["describe"][0], cfg())
    assert ids[:len(enc.encode_ordinary("Question: Describe the image."))] == enc.encode_ordinary(
        "Question: Describe the image.")  # dpo_bdhs.Data.prompt's text before the image slots
    assert "describe" in mm15.mixture(mm15.Config()) and "describe" in tasks.EVAL_TASKS


def test_video_frames_are_uniform_samples_and_answers_follow_the_clip():
    assert tasks.uniform_frames(12, 4) == [0, 4, 7, 11] and tasks.uniform_frames(5, 5) == [0, 1, 2, 3, 4]
    kinds, data = Counter(), bare_data()
    for i in range(40):
        item = tasks.task_item("video", "train", i, 0, 64)
        frames = [scene for scene, _, _ in item["images"]]
        assert len(frames) == tasks.VIDEO_FRAMES and len({(w, h) for _, w, h in item["images"]}) == 1
        names = [{shapes.visual_name(o) for o in f.objects} for f in frames]
        q, answer = item["question"], item["answer"]
        moving = [(a, b) for a, b in zip(frames[0].objects, frames[-1].objects) if a.box != b.box]
        if q.startswith("In which direction"):  # the named object's box moves that way, first -> last frame
            kinds["direction"] += 1
            (start, end), = moving
            step = tuple(int(np.sign(v)) for v in np.subtract(end.box, start.box)[:2])
            assert f"the {shapes.visual_name(start)}" in q and answer == {
                (-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}[step], (q, answer, step)
        elif q.startswith("Which shape moves"):
            kinds["mover"] += 1
            assert [shapes.visual_name(start) for start, _ in moving] == [answer]
        else:  # objects appear one per sampled frame and stay
            kinds["order"] += 1
            assert [len(n) for n in names] == sorted(len(n) for n in names) and all(
                a <= b for a, b in zip(names, names[1:]))
            first_seen = sorted((min(k for k, n in enumerate(names) if name in n), name)
                                for name in names[-1])
            assert len({k for k, _ in first_seen}) == len(first_seen)  # one object per frame
            if q == "What appears last?":
                assert answer == first_seen[-1][1]
            else:
                options = q.removeprefix("Which appears first, the ").removesuffix("?").split(" or the ")
                assert answer in options and names[0] & set(options) == {answer}
        if i == 0:  # frames are never split (MM1.5: splitting only below 3 images): one tile each
            pil = [tasks.render_shaped(*shaped) for shaped in item["images"]]
            ids, _, tiles = mm15.Data.sample(data, dict(item, pil=pil), cfg())
            assert tiles.shape[0] == tasks.VIDEO_FRAMES and ids.count(data.image_id) == K * tasks.VIDEO_FRAMES
    assert min(kinds.values()) >= 5 and len(kinds) == 3, kinds
    train = {repr(tasks.task_item("video", "train", i, 0, 64)["images"][0][0].objects) for i in range(30)}
    test = {repr(tasks.task_item("video", "test", i, 0, 64)["images"][0][0].objects) for i in range(30)}
    assert not train & test  # no eval clip is a training clip


def test_ui_items_list_widgets_ground_taps_and_refer_boxes_on_phone_shaped_screens():
    seen = Counter()
    for i in range(40):
        item = tasks.task_item("ui", "train", i, 0, 64)
        scene, w, h = item["images"][0]
        assert scene.kind == "ui" and w / h == pytest.approx(9 / 19.5, rel=0.05)  # phone-shaped
        widgets = [shapes.visual_name(o) for o in scene.objects]
        seen[item["task"]] += 1
        if item["task"] == "ui_list":
            assert item["question"] == "List the widgets." and item["answer"] == ", ".join(widgets)
            continue
        obj, = [o for o in scene.objects if tasks.box_px(o.bbox, scene, w, h) == item["box"]]
        if item["task"] == "ui_ground":  # Grd-i: "tap X" -> the box of X, scored at IoU >= 0.5
            assert item["question"] == f"Tap the {shapes.visual_name(obj)}. Give its box."
            pil = dict(item, pil=[Image.new("RGB", (w, h))])
            gold = tasks.item_texts(pil)[1]
            assert tasks.score(gold, pil, "ui_ground") and tasks.score("no box", pil, "ui_ground") is None
        else:  # Ref-i: a box -> the widget's name and its state (a button has none)
            assert "[" in tasks.item_texts(dict(item, pil=[Image.new("RGB", (w, h))]))[0]
            assert item["answer"] == shapes.visual_name(obj) + (f", {obj.state}" if obj.state else "")
    assert min(seen.values()) >= 5 and set(seen) == {"ui_list", "ui_ground", "ui_refer"}
    pools = tasks.ItemPools(seed=0, tile=32, n_cpt=1, n_train=2, n_eval=2)
    assert all(len(pools.test[t]) == 2 and {it["task"] for it in pools.test[t]} == {t}
               for t in tasks.SUBTASKS["ui"])
    assert list(pools.test) == list(tasks.EVAL_TASKS)


def rank_main(rank: int, port: int, argv: list) -> None:
    """One torchrun rank, forked from this process (no second torch import): the env torchrun sets."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool inherited across the fork
    mm15.main(argv)


def test_torchrun_two_ranks_train_and_score_as_one_process(tiny_init, tmp_path):
    """Two gloo ranks (as torchrun --nproc_per_node=2 starts them): each trains on half of the same global
    batch, so the logged losses, the final weights and the eval match one process's run with that batch
    (seen failing with each rank's loss not scaled by its share of the targets x world)."""
    args = ["--preset=smoke", f"--init={tiny_init}", "--cpt_steps=2", "--sft_steps=3", "--log_every=1",
            "--eval_items=2", "--max_new_tokens=2"]
    one = mm15.main([*args, f"--out_dir={tmp_path}/one"])
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*args, f"--out_dir={tmp_path}/two"]
    ranks = [mp.get_context("fork").Process(target=rank_main, args=(r, port, argv)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    logs = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert len(logs[0]) == 5 and logs[1] == pytest.approx(logs[0], rel=1e-5)
    weights = [load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    same = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s") and k != "samples"}
    assert same(one) == same(two)
    assert sorted(one["samples"]) == sorted(two["samples"])


def test_gpu_preset_resolves_builds_and_fits_its_samples():
    """The gpu preset (never run: no GPU in these sessions) passes check_config; from mm1's gpu preset's arch
    the model builds (on the meta device: no memory); at its tile size, samples of every category and of the
    continual pre-training fit seq_len (none would be skipped), and one rank's pre-rendered pools hold under
    32 GB of pixels (20000 items per category held 114 GB)."""
    c = mm15.parse_config(["--preset=gpu"])
    mm15.check_config(c)
    data, before = bare_data(), mm1.parse_config(["--preset=gpu"])
    mm1.check_config(before)
    arch = mm1.arch_of(before, data.enc.n_vocab, data.image_id)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in mm15.MM1(arch).parameters())
    assert 250e6 < n_params < 300e6, n_params  # 275 M
    c = dataclasses.replace(c, tile_size=arch["image_size"], image_tokens=arch["connector"]["image_tokens"])
    pools = {"cpt": [tasks.rendered(tasks.text_rich_caption("train", i, 0, c.tile_size)) for i in range(4)]}
    pools |= {k: [tasks.rendered(tasks.task_item(k, "train", i, 0, c.tile_size)) for i in range(4)]
              for k in tasks.CATEGORIES}
    longest, pixels = 0, 0
    for name, items in pools.items():
        for item in items:
            longest = max(longest, len(data.sample(item, dataclasses.replace(c, split=c.cpt_split))[0]))
            pixels += sum(3 * p.size[0] * p.size[1] for p in item["pil"]) * (
                c.n_cpt_items if name == "cpt" else c.n_train_items) / len(items)
    assert 10 * c.image_tokens < longest <= c.seq_len and pixels < 32e9, (longest, pixels)
