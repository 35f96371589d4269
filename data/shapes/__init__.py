"""ShapesWorld: a procedural, deterministic world of shapes, named emblems and text-rich scenes,
with every caption / QA / document format the paper scripts train and evaluate on.

    from data import shapes
    scene = shapes.make_scene("train", 0)            # scene graph, a pure function of its arguments
    img = shapes.render(scene, size=64)              # PIL RGB image, any size
    shapes.caption(scene, "dsc")                     # alttext | ssc | dsc | dsc+ | afc
    shapes.vqa(scene); shapes.pope(scene, "adversarial"); shapes.grounding(scene)

Modules: world (vocabulary, emblems, scene graphs), render (Pillow), text (captions and per-scene
tasks), tasks (multi-scene and text-only items, corpus), formats (readers / exporters).
CLI: python -m data.shapes preview | export --kind=caption|llava|preference|png --n=N --out=DIR | corpus
    | boxes | bench
"""

from .formats import (
    export,
    llava_counts,
    llava_turns,
    load_image,
    read_image_text,
    read_llava_json,
    read_preference_jsonl,
    scene_from_dict,
    scene_to_dict,
)
from .render import render
from .tasks import corpus, interleaved_document, multi_image, preference_pair, text_passage, video
from .text import (
    CAPTION_FORMATS,
    DSC_MAX_TOKENS,
    alttext,
    approx_tokens,
    box_to_grid,
    caption,
    emblem_facts,
    format_box,
    grounding,
    hallucinations,
    iou,
    object_mentions,
    parse_box,
    pope,
    position,
    reference,
    referring,
    token_count,
    visual_name,
    vqa,
)
from .world import (
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    EMBLEM_BADGE,
    EMBLEM_GLYPHS,
    EMBLEMS,
    KINDS,
    SHAPES,
    SIZES,
    SPLITS,
    Obj,
    Scene,
    TextItem,
    make_scene,
)

__all__ = [
    "BACKGROUNDS", "CAPTION_FORMATS", "COLORS", "COLOR_RGB", "DSC_MAX_TOKENS", "EMBLEMS", "EMBLEM_BADGE",
    "EMBLEM_GLYPHS", "KINDS", "SHAPES", "SIZES", "SPLITS", "Obj", "Scene", "TextItem", "alttext",
    "approx_tokens", "box_to_grid", "caption", "corpus", "emblem_facts", "export", "format_box",
    "grounding", "hallucinations", "interleaved_document", "iou", "llava_counts", "llava_turns",
    "object_mentions", "load_image", "make_scene", "multi_image", "parse_box", "pope", "position",
    "preference_pair", "read_image_text", "read_llava_json", "read_preference_jsonl", "reference",
    "referring", "render", "token_count", "scene_from_dict", "scene_to_dict", "text_passage", "video",
    "visual_name", "vqa",
]
