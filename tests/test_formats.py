"""Users' files in their ecosystems' real shapes (hand-written fixtures in tests/fixtures/): LLaVA mixes,
open_clip TSVs, Excel CSVs, TRL preference JSONL, broken versions of each; the exports read back by the
same rules; and the LLaVA export's leak test (no turn gives away a later turn's answer)."""
import csv
import json
import re
from pathlib import Path

import pytest

from data import InputError
from data import shapes as S
from data.jsonl import iter_jsonl

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"


# ----------------------------------------------------------------------------- every fixture: result or error
def test_llava_mix_excerpt_text_only_multi_image_and_image_folder():
    items = S.read_llava_json(FIXTURES / "llava_mix_excerpt.json", image_folder=IMAGES)
    assert S.llava_counts(items) == {"items": 4, "text-only": 1, "single-image": 2, "multi-image": 1}
    coco, sharegpt, ocr, multi = items
    assert coco["image"] == str(IMAGES / "coco/train2017/000000215677.jpg")
    assert coco["images"] == [coco["image"]]
    assert sharegpt["id"] == "Kq3xZpa_0" and sharegpt["images"] == [] and "image" not in sharegpt
    assert "\u2014" in sharegpt["conversations"][1]["value"]  # JSON escapes decoded
    assert ocr["conversations"][0]["value"].endswith("<image>")  # the marker may close the question too
    assert multi["image"] == [str(IMAGES / "onevision/chart_a.png"), str(IMAGES / "onevision/chart_b.png")]
    assert [it["line"] for it in items] == [2, 24, 38, 60]
    assert all(S.load_image(p).size == (16, 16) for it in items for p in it["images"])
    # without the image folder, LLaVA-style relative paths are looked for next to the JSON file: not there
    with pytest.raises(InputError, match=r"llava_mix_excerpt\.json:2: item 0 \(id 000000215677\): image "
                       r"'coco/train2017/000000215677\.jpg' not found .*data file's folder"):
        S.read_llava_json(FIXTURES / "llava_mix_excerpt.json")


def test_open_clip_tsv_and_excel_csv():
    rows = S.read_image_text(FIXTURES / "openclip_train.tsv")  # tab, filepath / title, file-relative paths
    assert [r["caption"] for r in rows][:2] == ["a yellow taxi waiting at a crossing, seen from above",
                                                 'the "blue hour" over a harbour']
    assert rows[0]["title"] == rows[0]["caption"]
    assert rows[3]["filepath"] == str(IMAGES / "cc3m/00000/000000078.jpg")
    # Excel's "CSV UTF-8": BOM, CRLF, comma, a `caption` column, paths relative to an image folder
    rows = S.read_image_text(FIXTURES / "excel_utf8_bom.csv", image_folder=IMAGES)
    assert list(rows[0])[:3] == ["caption", "filepath", "photographer"]  # no invisible BOM in the first name
    assert [r["caption"] for r in rows] == ["Café terrace at night, Arles",
                                            'A 5" vinyl single on a turntable', "Sunflowers in a field"]
    assert rows[0]["photographer"] == "R. Müller" and rows[1]["photographer"] == ""
    assert rows[2]["filepath"] == str(IMAGES / "cc3m/00000/000000056.jpg")


def test_trl_preference_jsonl():
    rows = S.read_preference_jsonl(FIXTURES / "trl_preference.jsonl")
    vision, standard, chat, plain = rows
    assert vision["prompt"] == "<image>\nWhat is the main object in this picture?"
    assert vision["chosen"] == "A red square fills the whole picture."
    assert vision["images"] == [str(IMAGES / "rlaif/00001.png")] == [vision["image"]]
    assert vision["prompt_messages"] == [{"role": "user", "content": vision["prompt"]}]
    assert standard["prompt"] == "<image>\nWhat colour is the background?"
    assert standard["prompt_messages"] is None
    assert chat["prompt_messages"][0] == {"role": "system", "content": "Answer in one word."}
    assert (chat["chosen"], chat["rejected"], chat["images"]) == ("Red.", "Purple.", [])
    assert (plain["prompt"], plain["chosen"], plain["rejected"]) == ("The sky is", " blue.", " green.")


BROKEN = [  # (reader, fixture, keyword arguments, the one-line error it must print)
    (S.read_llava_json, "llava_broken_json.json", {"image_folder": IMAGES},
     r"llava_broken_json\.json:38: invalid JSON \(Expecting ',' or '\]' after a list item at column 3\)"),
    (S.read_llava_json, "llava_missing_image.json", {"image_folder": IMAGES},
     r"llava_missing_image\.json:38: item 2 \(id 0439139597\): image "
     r"'ocr_vqa/images/0439139598\.jpg' not found"),
    (S.read_llava_json, "llava_marker_mismatch.json", {"image_folder": IMAGES},
     r"llava_marker_mismatch\.json:60: item 3 \(id ov_multi_chart_0\): 2 image\(s\) but 1 '<image>' marker"),
    (S.read_llava_json, "llava_latin1.json", {"image_folder": IMAGES},
     r"llava_latin1\.json:34: not UTF-8 \(byte 0xe9 at column 76\)"),
    (S.read_image_text, "openclip_unterminated_quote.tsv", {},
     r"openclip_unterminated_quote\.tsv:3: a quoted field starting here never closes"),
    (S.read_image_text, "openclip_missing_field.tsv", {},
     r"openclip_missing_field\.tsv:3: expected 2 tab-separated fields like the header, got 1"),
    (S.read_image_text, "excel_cp1252.csv", {"image_folder": IMAGES},
     r"excel_cp1252\.csv:2: not UTF-8 \(byte 0xe9 at column 5\)"),
    (S.read_image_text, "excel_utf8_bom.csv", {},  # paths relative to an image folder, not to the file
     r"excel_utf8_bom\.csv:2: image 'cc3m/00000/000000012\.jpg' not found"),
    (S.read_preference_jsonl, "trl_legacy_image_key.jsonl", {},
     r"trl_legacy_image_key\.jsonl:1: unknown key\(s\) 'image' \(TRL's key is 'images', a list of paths\)"),
    (S.read_preference_jsonl, "trl_typo_key.jsonl", {}, r"trl_typo_key\.jsonl:2: unknown key\(s\) 'choosen'"),
    (S.read_preference_jsonl, "trl_placeholder_mismatch.jsonl", {},
     r"trl_placeholder_mismatch\.jsonl:1: 1 image\(s\) but 0 image placeholder\(s\) in the prompt"),
    (S.read_preference_jsonl, "trl_bad_json.jsonl", {}, r"trl_bad_json\.jsonl:2: invalid JSON"),
]


@pytest.mark.parametrize("reader, name, kwargs, error", BROKEN, ids=[b[1] for b in BROKEN])
def test_broken_fixture_gives_one_line_error(reader, name, kwargs, error):
    with pytest.raises(InputError, match=error) as info:
        reader(FIXTURES / name, **kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(FIXTURES / name))


READERS = [S.read_llava_json, S.read_image_text, S.read_preference_jsonl, S.load_image]


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_names_a_folder_or_a_missing_file(reader, tmp_path):
    with pytest.raises(InputError, match=rf"{re.escape(str(tmp_path))}: is a folder, expected a file"):
        reader(tmp_path)
    with pytest.raises(InputError, match=r"nope\.x: file not found"):
        reader(tmp_path / "nope.x")
    if reader is not S.load_image:
        with pytest.raises(InputError, match=r"nowhere: image folder not found"):
            reader(FIXTURES / "trl_preference.jsonl", image_folder=tmp_path / "nowhere")


def test_jsonl_reader_bad_bytes_and_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:3: not UTF-8 \(byte 0xe9 at column 11\)"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: expected a JSON object, got list"):
        list(iter_jsonl(path))
    assert issubclass(InputError, ValueError)  # callers that catch ValueError keep working


# ----------------------------------------------------------------------------- CSV / TSV details
def _pairs_file(tmp_path, name, text):
    (tmp_path / "a.png").write_bytes((IMAGES / "rlaif/00001.png").read_bytes())
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_separator_sniffed_and_columns_configurable(tmp_path):
    for sep in ("\t", ",", ";", "|"):
        path = _pairs_file(tmp_path, "p.csv", f'title{sep}filepath\n"a red, round thing"{sep}a.png\n')
        assert S.read_image_text(path)[0]["caption"] == "a red, round thing", repr(sep)
    path = _pairs_file(tmp_path, "p.tsv", "img\ttext\ttitle\na.png\tx\ty\n")
    row = S.read_image_text(path, img_key="img", caption_key="text")[0]
    assert (row["caption"], row["title"], row["filepath"]) == ("x", "y", str(tmp_path / "a.png"))
    with pytest.raises(InputError, match=r"p\.tsv:1: missing column 'filepath' \(header split on tab"):
        S.read_image_text(path)
    path = _pairs_file(tmp_path, "p.csv", "filepath,text\na.png,x\n")
    with pytest.raises(InputError, match=r"p\.csv:1: missing column 'title' \(open_clip's\) or 'caption' "
                       r"\(header split on comma: \['filepath', 'text'\]\)"):
        S.read_image_text(path)
    path = _pairs_file(tmp_path, "p.csv", "filepath,caption\na.png,x\n")
    with pytest.raises(InputError, match=r"p\.csv:1: missing column 'title'"):
        S.read_image_text(path, caption_key="title")
    assert S.read_image_text(path, sep=",")[0]["caption"] == "x"


def test_csv_strict_quotes_and_oversized_field(tmp_path):
    # non-strict csv would return 2 rows here: the open quote on line 3 swallows lines 4 and 5
    text = 'filepath,caption\na.png,one\na.png,"two\na.png,three\na.png,four\n'
    path = _pairs_file(tmp_path, "p.csv", text)
    with pytest.raises(InputError, match=r"p\.csv:3: a quoted field starting here never closes"):
        S.read_image_text(path)
    path = _pairs_file(tmp_path, "p.csv", 'filepath,caption\na.png,"two" words\n')
    with pytest.raises(InputError, match=r"p\.csv:2: malformed comma-separated line"):
        S.read_image_text(path)
    path = _pairs_file(tmp_path, "p.tsv", "filepath\ttitle\na.png\tshort\na.png\t" + "w" * 131_073 + "\n")
    with pytest.raises(InputError, match=r"p\.tsv:3: a field is longer than 131072 characters"):
        S.read_image_text(path)
    path = _pairs_file(tmp_path, "p.tsv", "filepath\ttitle\na.png\t\n")
    with pytest.raises(InputError, match=r"p\.tsv:2: empty 'title'"):
        S.read_image_text(path)
    path = _pairs_file(tmp_path, "p.tsv", "filepath\ttitle\n")
    with pytest.raises(InputError, match=r"p\.tsv: no image-text pairs"):
        S.read_image_text(path)


def test_caption_export_is_what_open_clip_csvdataset_reads(tmp_path, monkeypatch):
    """open_clip's CsvDataset: pd.read_csv(file, sep="\\t"), images = df["filepath"], captions = df["title"],
    Image.open(path) from the working folder. Same rules without pandas: csv with tab, '"' quoting."""
    tsv = S.export("caption", 6, tmp_path / "cap", split="val").with_suffix(".tsv")
    monkeypatch.chdir(tmp_path.parent)  # any working folder: the paths must not depend on it
    with open(tsv, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f, delimiter="\t", quotechar='"', doublequote=True, strict=True))
    header, body = table[0], table[1:]
    assert header[:2] == ["filepath", "title"] and len(body) == 6
    pandas_na = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                 "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
    assert not {field for fields in body for field in fields} & pandas_na  # read_csv would turn them to NaN
    for i, fields in enumerate(body):
        row = dict(zip(header, fields))
        scene = S.make_scene("val", i)
        assert row["title"] == S.caption(scene, "dsc") and row["alttext"] == S.caption(scene, "alttext")
        assert S.load_image(row["filepath"]).tobytes() == S.render(scene, 64).tobytes()
    assert [r["caption"] for r in S.read_image_text(tsv)] == [f[1] for f in body]


# ----------------------------------------------------------------------------- LLaVA export: sizes and leaks
def test_llava_export_round_trip_and_448px_text_rich(tmp_path):
    items = S.read_llava_json(S.export("llava", 8, tmp_path / "llava"))
    assert S.llava_counts(items)["single-image"] == 8
    for i, it in enumerate(items):
        kind = S.formats._kind_for(i)
        scene = S.make_scene("train", i, 0, kind)
        convs = it["conversations"]
        turns = [(q["value"], a["value"]) for q, a in zip(convs[::2], convs[1::2])]
        assert turns[0][0].startswith("<image>\n")
        assert turns[-1] == ("Describe the image.", S.caption(scene, "dsc"))
        assert [(q.removeprefix("<image>\n"), a) for q, a in turns] == S.llava_turns(scene)
        assert S.load_image(it["image"]).size == ((64, 64) if kind == "natural" else (448, 448))
    items = S.read_llava_json(S.export("llava", 4, tmp_path / "s", size=40))
    assert S.load_image(items[3]["image"]).size == (40, 40)


_BOX = re.compile(r"\[\d+, \d+, \d+, \d+\]")


def _given_away(earlier: str, answer: str) -> bool:
    """The test's own reading of "an earlier turn gives the answer away": a box that occurs verbatim; a
    number, also written as a word; a phrase whose every word occurs. yes / no answers never."""
    words = set(re.findall(r"[\w-]+", earlier.lower()))
    answer = answer.lower()
    if answer in ("yes", "no"):
        return False
    if _BOX.fullmatch(answer):
        return answer in earlier
    if answer.isdigit():
        return answer in words or (0 < int(answer) <= 10 and S.text.NUMBER_WORDS[int(answer)] in words)
    return set(re.findall(r"[\w-]+", answer)) <= words


def test_llava_export_no_turn_gives_away_a_later_answer(tmp_path):
    """The review found the referring question quoting the box just given (200/200 items) and "Where is X?"
    answered by the first turn's description (112/319): here neither happens, nor any other give-away."""
    items = json.loads(S.export("llava", 200, tmp_path / "llava", size=32).read_text())
    where_questions = grounded_and_referred = 0
    for it in items:
        values = [c["value"] for c in it["conversations"]]
        for j in range(1, len(values), 2):
            earlier = " ".join(values[:j - 1])
            question, answer = values[j - 1], values[j]
            assert not _given_away(earlier, answer), (it["id"], question, answer)
            where_questions += question.startswith("Where is") and not question.endswith("box.")
        pairs = list(zip(values[::2], values[1::2]))
        ground = [S.parse_box(a) for q, a in pairs if q.endswith("Answer with a box.")]
        refer = [S.parse_box(q) for q in values[::2] if q.startswith("What is the object at")
                 or q.startswith("What does the text at")]
        if ground and refer:
            grounded_and_referred += 1
            assert S.iou(ground[0], refer[0]) == 0.0, it["id"]  # two different objects
    assert where_questions > 40 and grounded_and_referred > 120


def test_leak_checker_catches_the_old_export_order():
    """The leak test above can fail: the old export asked about the grounded object again, so the grounding
    question names the referring answer, and its description came first, stating every position."""
    scene = S.make_scene("train", 0)
    obj = next(o for o in scene.objects if S.reference(o, scene))
    box = S.format_box(S.box_to_grid(obj.box, scene))
    grounding_question = f"Where is {S.reference(obj, scene)}? Answer with a box."
    assert _given_away(grounding_question + " " + box, S.visual_name(obj))
    description = S.caption(scene, "dsc")
    where = [(q, a) for q, a in S.vqa(scene) if q.startswith("Where is")]
    assert where and any(_given_away(description, a) for q, a in where)


# ----------------------------------------------------------------------------- TRL preference export
def test_preference_export_is_trl_conversational_and_reads_back(tmp_path):
    main = S.export("preference", 3, tmp_path / "pref")
    raw = [json.loads(line) for line in main.read_text().splitlines()]
    assert all(set(r) == {"prompt", "chosen", "rejected", "images"} for r in raw)
    assert all(isinstance(r["images"], list) for r in raw)
    assert raw[0]["prompt"][0]["content"][0] == {"type": "image"}
    for i, row in enumerate(S.read_preference_jsonl(main)):
        pair = S.preference_pair("train", i)
        assert row["prompt"] == "<image>\n" + pair["prompt"]
        assert (row["chosen"], row["rejected"]) == (pair["chosen"], pair["rejected"])
        assert S.load_image(row["images"][0]).tobytes() == S.render(pair["scene"], 64).tobytes()
