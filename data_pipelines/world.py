"""A procedural image-text world small enough to learn on a laptop: flat-coloured filled shapes on a plain
background, with every scene's ground truth.

A scene holds one to three objects, each a (colour, shape) pair that occurs once in the scene, with a centre and
a size; triangles point up, squares are axis-aligned, objects never overlap and their centres differ in x by
at least MIN_DX pixels (so "left of" is never ambiguous). Everything is a function of (seed, split, index).

`write_world` turns scenes into the source kinds real corpora use, in data/sample's layout (so every reader,
the tiny text tokenizer's trainer and the tokenizer trainers take it as they take the photo sample):

    images/<split>_<i>.png      the rendered scenes
    train.jsonl, holdout.jsonl  {"image", "caption"} (one row per image; tokenizer training and held-out pairs)
    captions.jsonl              {"image", "caption"} several phrasings per training scene (the caption source)
    llava.json                  LLaVA conversations (world.turns_per_conversation questions each): colour, shape, count, yes/no (balanced),
                                left/right; a caption request for half the scenes
    text.jsonl                  {"text"} the text-only source
    questions.jsonl             held-out questions {"image", "question", "answer", "type", "heldout_combo"}
    prompts.jsonl               held-out generation prompts {"prompt", "category", "spec", "heldout_combo"}
    scenes.jsonl                every scene's ground truth
    WORLD.json                  the config that made it (a rerun with another config is refused)

Colour-shape combinations in `heldout_combos` appear in no training image, caption or question; held-out
scenes contain them, and the scores report them apart (compositional generalisation).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from semhitok.common.config_io import ConfigError, check_min, check_range
from semhitok.common.io import atomic_dir, read_json, read_jsonl, write_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
NUMBERS = {1: "one", 2: "two", 3: "three"}
MIN_DX = 8  # pixels between object centres in x (at 64 px; scaled with image_size)


@dataclass
class WorldConfig:
    enabled: bool = False  # `semhitok pipeline` writes the world before anything else
    out_dir: str = ""  # empty: <run_dir>/world
    seed: int = 0
    image_size: int = 64
    train_scenes: int = 3000
    holdout_scenes: int = 300
    max_objects: int = 3
    min_size: float = 0.25  # object size (bounding-box side) as a share of the image side
    max_size: float = 0.4
    # A scene's only object is drawn in this range instead. Large enough that the shapes preset's tokenizer gets its
    # outline back through 8-px patches: decoded held-out single objects pass the checker (eval/world_eval.check)
    # 100% at 4 cells of 8 px, 59% at 3 and about none at 2, where a circle comes back as a square of 4 patches.
    single_min_size: float = 0.5
    single_max_size: float = 0.5
    # Objects snap to a grid x grid lattice of cells (sizes and corners in whole cells; 0: continuous). With the
    # tokenizer's patch grid (8 at 64 px) every object edge falls on a patch edge or crosses a patch in one of a few
    # ways, which a tokenizer trained for a minute on 2 CPU cores can reconstruct; continuous positions ask for
    # sub-patch geometry it does not learn at that budget (shapes come back as blocks of patches).
    snap: int = 8
    captions_per_scene: int = 2  # rows per training scene in captions.jsonl
    caption_requests: float = 0.5  # share of training scenes with a "Describe the image." conversation
    # Questions asked per training scene, drawn from all it answers (0: all of them, about 7). Fewer questions
    # over more scenes: the same number of conversations shows the LLM more images to learn from, not the same
    # images again to memorise.
    questions_per_scene: int = 0
    # Questions per conversation (1: one each). More turns show the LLM more answers for the image tokens it reads
    # once. No two turns of a conversation are about a common object (group_turns), so no answer can be read off
    # an earlier turn's text ("What color is the circle?" "blue" ... "Is there a blue circle?"); the held-out
    # questions stay one per image.
    turns_per_conversation: int = 1
    # Never in training; "colour shape" strings. Held-out scenes include them (about a third of the scenes).
    heldout_combos: list[str] = field(default_factory=lambda: ["green circle", "yellow square"])
    text_rows: int = 500  # rows of the text-only source
    # The share of all possible scenes that only the held-out split draws (by a hash of the scene): a one-object
    # scene has 10 seen combinations x 25 places on the lattice, so splits drawn independently would share most.
    holdout_share: float = 0.2

    def __post_init__(self) -> None:
        check_min(self, 16, "image_size")
        check_min(self, 1, "train_scenes", "holdout_scenes", "captions_per_scene", "turns_per_conversation")
        check_min(self, 0, "seed", "text_rows", "snap", "questions_per_scene")
        check_range(self, 1, 3, "max_objects")
        check_range(self, 0.01, 0.99, "holdout_share")
        check_range(self, 0.0, 1.0, "caption_requests")
        check_range(self, 0.05, 0.5, "min_size", "max_size", "single_min_size", "single_max_size")
        for lo, hi in (("min_size", "max_size"), ("single_min_size", "single_max_size")):
            if getattr(self, lo) > getattr(self, hi):
                raise ConfigError(f"{lo}: {getattr(self, lo)} is above {hi}={getattr(self, hi)}")
        for combo in self.heldout_combos:
            colour, _, shape = combo.partition(" ")
            if colour not in COLOURS or shape not in SHAPES:
                raise ConfigError(f"heldout_combos: {combo!r} is not '<colour> <shape>' with a colour of "
                                  f"{sorted(COLOURS)} and a shape of {list(SHAPES)}")
        if len(self.heldout_combos) >= len(COLOURS) * len(SHAPES):
            raise ConfigError("heldout_combos: holds out every combination")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    x: float  # centre, pixels
    y: float
    size: float  # bounding-box side, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    size: int  # image side, pixels

    def to_json(self) -> dict:
        return {"size": self.size, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        return cls(tuple(Obj(**o) for o in d["objects"]), d["size"])

    def by_x(self) -> list[Obj]:
        return sorted(self.objects, key=lambda o: o.x)


# -- scenes ---------------------------------------------------------------------------------------------
def combos(cfg: WorldConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training combinations, held-out combinations) as (colour, shape) pairs"""
    held = [tuple(c.split(" ", 1)) for c in cfg.heldout_combos]
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held], held


def random_scene(rng: random.Random, cfg: WorldConfig, pool: list[tuple[str, str]], n: int,
                 must: tuple[str, str] | None = None) -> Scene:
    """n objects of distinct (colour, shape) from pool (plus `must`), placed without overlap."""
    side = cfg.image_size
    min_dx = MIN_DX * side / 64
    if n == 1:
        lo, hi, bound = cfg.single_min_size, cfg.single_max_size, "single_max_size"
    else:
        lo, hi, bound = cfg.min_size, cfg.max_size, "max_size"
    for _ in range(1000):
        picked = rng.sample(pool, n - (must is not None))
        if must is not None:
            picked = [must, *picked]
            if len(set(picked)) < n:
                continue
        objs: list[Obj] = []
        for colour, shape in picked:
            for _ in range(100):
                if cfg.snap:
                    cell = side / cfg.snap
                    k = rng.randint(max(1, round(lo * cfg.snap)), max(1, round(hi * cfg.snap)))
                    s = k * cell
                    x, y = (rng.randint(0, cfg.snap - k) + k / 2) * cell, (rng.randint(0, cfg.snap - k) + k / 2) * cell
                else:
                    s = rng.uniform(lo, hi) * side
                    x, y = rng.uniform(s / 2 + 1, side - s / 2 - 1), rng.uniform(s / 2 + 1, side - s / 2 - 1)
                gap = side / cfg.snap - 0.01 if cfg.snap else 2
                if all(max(abs(x - o.x) - (s + o.size) / 2, abs(y - o.y) - (s + o.size) / 2) > gap and abs(x - o.x) >= min_dx
                       for o in objs):
                    objs.append(Obj(colour, shape, round(x, 2), round(y, 2), round(s, 2)))
                    break
        if len(objs) == n:
            rng.shuffle(objs)
            return Scene(tuple(objs), side)
    raise RuntimeError(f"could not place {n} objects in {side} px (sizes {lo}-{hi}): lower world.{bound}")


def held_out(scene: Scene, share: float) -> bool:
    """Whether the scene belongs to the held-out split: a hash of its objects (not Python's salted hash()) below
    `share`, so no held-out image is ever a training image."""
    key = json.dumps([scene.size, *sorted(sorted(asdict(o).items()) for o in scene.objects)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") < share * 2**64


def make_scenes(cfg: WorldConfig, split: str) -> list[Scene]:
    """The split's scenes: train from the training combinations only; holdout, a third of them containing a
    held-out combination. Each split draws only its own scenes (held_out). Deterministic in (cfg.seed, split)."""
    rng = random.Random(f"{cfg.seed}:{split}")
    train_pool, held = combos(cfg)
    scenes = []
    for i in range(cfg.train_scenes if split == "train" else cfg.holdout_scenes):
        n = rng.randint(1, cfg.max_objects)
        must = held[i % len(held)] if split == "holdout" and held and i % 3 == 2 else None
        for _ in range(1000):
            scene = random_scene(rng, cfg, train_pool, n, must)
            if held_out(scene, cfg.holdout_share) == (split == "holdout"):
                break
        else:
            raise RuntimeError(f"no {split} scene of {n} objects in 1000 draws: raise or lower world.holdout_share")
        scenes.append(scene)
    return scenes


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image: flat colours, no anti-aliasing (every pixel is a palette colour)."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        h = o.size / 2
        box = (o.x - h, o.y - h, o.x + h - 1, o.y + h - 1)  # PIL's boxes include their last pixel
        if o.shape == "circle":
            draw.ellipse(box, fill=COLOURS[o.colour])
        elif o.shape == "square":
            draw.rectangle(box, fill=COLOURS[o.colour])
        else:
            draw.polygon([(o.x - 0.5, o.y - h), (o.x + h - 1, o.y + h - 1), (o.x - h, o.y + h - 1)], fill=COLOURS[o.colour])
    return img


# -- text -----------------------------------------------------------------------------------------------
def a(obj: Obj | str) -> str:
    return f"a {obj.name if isinstance(obj, Obj) else obj}"


def listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene in one of several phrasings; single objects are most often the plain form
    ("a red circle"), pairs often a relation ("a blue square left of a yellow triangle")."""
    objs = list(scene.objects)
    n = len(objs)
    names = [a(o) for o in objs]
    if n == 1:
        return rng.choice([names[0]] * 3 + [f"{names[0]} on a plain background", f"one {objs[0].name}",
                                             f"a picture of {names[0]}"])
    left, right = scene.by_x()[0], scene.by_x()[-1]
    forms = [listing(names), f"{NUMBERS[n]} shapes: {listing(names)}"]
    if n == 2:
        forms += [f"{a(left)} left of {a(right)}", f"{a(right)} right of {a(left)}"] * 2
    return rng.choice(forms)


def yes_no_pair(scene: Scene, rng: random.Random, allowed: list[tuple[str, str]], answer: bool) -> tuple[str, str]:
    """The (colour, shape) to ask 'Is there a green triangle?' about, with the wanted answer; negatives (as POPE
    samples them) share the colour or the shape of an object in the scene half the time (adversarial), else any
    absent combination."""
    present = {(o.colour, o.shape) for o in scene.objects}
    if answer:
        colour, shape = rng.choice(sorted(present))
    else:
        absent = [c for c in allowed if c not in present]
        near = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
        colour, shape = rng.choice(near if near and rng.random() < 0.5 else absent)
    return colour, shape


def questions(scene: Scene, rng: random.Random, allowed: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(type, question, answer) about the scene: colour of a shape that occurs once, shape of a colour that
    occurs once, count, two yes/no (one yes, one no: POPE's balance), two left/right for two objects or more."""
    return [(kind, q, ans) for kind, q, ans, _ in asked(scene, rng, allowed)]


def asked(scene: Scene, rng: random.Random, allowed: list[tuple[str, str]]) -> list[tuple[str, str, str, frozenset[int]]]:
    """questions() with, for each, the indices of the objects whose colour or shape its text gives away: the
    object asked about, both objects of a left/right question, and for a "no" the objects sharing its colour
    or shape. Two questions about disjoint objects cannot answer each other."""
    out = []
    shapes = [o.shape for o in scene.objects]
    colours = [o.colour for o in scene.objects]
    for i, o in enumerate(scene.objects):
        if shapes.count(o.shape) == 1:
            out.append(("colour", f"What color is the {o.shape}?", o.colour, frozenset({i})))
        if colours.count(o.colour) == 1:
            out.append(("shape", f"What shape is the {o.colour} object?", o.shape, frozenset({i})))
    out.append(("count", "How many shapes are there?", NUMBERS[len(scene.objects)], frozenset()))
    for answer in (True, False):
        colour, shape = yes_no_pair(scene, rng, allowed, answer)
        about = [i for i, o in enumerate(scene.objects)
                 if (o.colour, o.shape) == (colour, shape) or (not answer and (o.colour == colour or o.shape == shape))]
        out.append(("yes_no", f"Is there a {colour} {shape}?", "yes" if answer else "no", frozenset(about)))
    if len(scene.objects) >= 2:
        pairs = [(i, j) for i in range(len(scene.objects)) for j in range(len(scene.objects)) if i != j]
        for i, j in rng.sample(pairs, 2):
            p, q_ = scene.objects[i], scene.objects[j]
            out.append(("left_right", f"Is the {p.name} left or right of the {q_.name}?", "left" if p.x < q_.x else "right",
                        frozenset({i, j})))
    return out


def conversations(scene: Scene, rng: random.Random, allowed: list[tuple[str, str]], image: str, ident: str,
                  caption_share: float, per_scene: int = 0, turns: int = 1) -> list[dict]:
    """The scene's questions as LLaVA-format conversations of up to `turns` question turns each, no two of them
    about a common object (group_turns), and for a share `caption_share` of the scenes a caption request as one
    more conversation. `per_scene` > 0 keeps that many questions, drawn at random (yes and no equally likely)."""
    qa = [(q, a_, about) for _, q, a_, about in asked(scene, rng, allowed)]
    if 0 < per_scene < len(qa):
        qa = rng.sample(qa, per_scene)
    if turns > 1:
        rng.shuffle(qa)  # question kinds come in a fixed order; shuffled, conversations mix them
    groups = group_turns(qa, turns)
    if rng.random() < caption_share:
        groups.append([("Describe the image.", caption(scene, rng))])
    return [{"id": f"{ident}_{k}", "image": image,
             "conversations": [turn for j, (q, ans) in enumerate(group)
                               for turn in ({"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                                            {"from": "gpt", "value": ans})]}
            for k, group in enumerate(groups)]


def group_turns(qa: list[tuple[str, str, frozenset[int]]], turns: int) -> list[list[tuple[str, str]]]:
    """(question, answer, objects it is about) -> conversations of at most `turns` (question, answer) pairs, in
    order, no two of one conversation about a common object: no answer can be read off an earlier turn's text
    ("What color is the circle?" "blue" ... "Is there a blue circle?") instead of the image, which the held-out
    questions, asked one per image, could not do. Each pair goes to the first conversation it fits."""
    groups: list[tuple[list[tuple[str, str]], set[int]]] = []
    for q, ans, about in qa:
        for group, used in groups:
            if len(group) < turns and not about & used:
                group.append((q, ans))
                used |= about
                break
        else:
            groups.append(([(q, ans)], set(about)))
    return [group for group, _ in groups]


def text_row(rng: random.Random, allowed: list[tuple[str, str]]) -> str:
    colour, shape = rng.choice(allowed)
    return rng.choice([
        f"The {shape} is {colour}.",
        f"A {colour} {shape} is a {shape} that is {colour}.",
        f"Shapes come in {listing(list(COLOURS))}.",
        f"There are three shapes: {listing(list(SHAPES))}.",
        "A square has four corners, a triangle three, a circle none.",
        f"One, two, three: {NUMBERS[rng.randint(1, 3)]} {shape}.",
    ])


# -- generation prompts (GenEval's categories, for the checker in eval/world_eval.py) -------------------
def prompts(scene: Scene, rng: random.Random) -> list[dict]:
    """Prompts this held-out scene answers, each with the spec the checker verifies:
    single_object 'a red circle'; two_objects 'a red circle and a blue square'; counting 'three shapes';
    position 'a red circle left of a blue square'. spec: {"objects": [[colour, shape]...], "count": n,
    "left_of": [i, j] or None}."""
    objs = scene.by_x()
    n = len(objs)
    pairs = [[o.colour, o.shape] for o in objs]
    if n == 1:
        return [{"prompt": a(objs[0]), "category": "single_object", "spec": {"objects": pairs, "count": 1}}]
    out = [{"prompt": f"{NUMBERS[n]} shapes", "category": "counting", "spec": {"objects": [], "count": n}}]
    if n == 2:
        out.append({"prompt": listing([a(o) for o in rng.sample(objs, 2)]), "category": "two_objects",
                    "spec": {"objects": pairs, "count": 2}})
        out.append({"prompt": f"{a(objs[0])} left of {a(objs[1])}", "category": "position",
                    "spec": {"objects": pairs, "count": 2, "left_of": [0, 1]}})
    return out


# -- writing ----------------------------------------------------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_world(cfg: WorldConfig, out: str | Path) -> Path:
    """Render the world into `out` (atomically: a half-written world is never seen). An existing world made
    with the same config is kept; one made with another config is refused with one line."""
    out = Path(out)
    record = {"world": asdict(cfg) | {"enabled": True, "out_dir": ""}, "format": 3}  # 2: one question per conversation; 3: disjoint splits
    if cfg.turns_per_conversation == 1:  # worlds written before the option existed stay valid
        del record["world"]["turns_per_conversation"]
    if (out / "WORLD.json").is_file():
        old = read_json(out / "WORLD.json")  # (depth-limited: a hostile file is one line, not a RecursionError)
        if old != record:
            raise ValueError(f"{out}: holds a world made with another config (WORLD.json); pick another "
                             "world.out_dir or delete it")
        return out
    train_pool, held = combos(cfg)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        rows: dict[str, list[dict]] = {k: [] for k in ("train", "holdout", "captions", "text", "questions", "prompts",
                                                          "scenes")}
        llava = []
        for split in ("train", "holdout"):
            rng = random.Random(f"{cfg.seed}:{split}:text")
            for i, scene in enumerate(make_scenes(cfg, split)):
                image = f"images/{split}_{i:05d}.png"
                render(scene).save(tmp / image)
                heldout = any((o.colour, o.shape) in held for o in scene.objects)
                rows["scenes"].append({"image": image, "split": split, "heldout_combo": heldout, **scene.to_json()})
                rows[split].append({"image": image, "caption": caption(scene, rng)})
                if split == "train":
                    rows["captions"] += [{"image": image, "caption": caption(scene, rng)} for _ in range(cfg.captions_per_scene)]
                    llava += conversations(scene, rng, train_pool, image, f"train_{i}", cfg.caption_requests,
                                           cfg.questions_per_scene, cfg.turns_per_conversation)
                else:
                    for kind, q, ans in questions(scene, rng, train_pool + held):
                        named = any(f"{c} {s}" in q for c, s in held)  # "Is there a green circle?" "no"
                        rows["questions"].append({"image": image, "question": q, "answer": ans, "type": kind,
                                                  "heldout_combo": heldout or named})
                    for p in prompts(scene, rng):
                        rows["prompts"].append({**p, "heldout_combo": heldout})
        rng = random.Random(f"{cfg.seed}:text")
        rows["text"] = [{"text": text_row(rng, train_pool)} for _ in range(cfg.text_rows)]
        for name, data in rows.items():
            _jsonl(tmp / f"{name}.jsonl", data)
        (tmp / "llava.json").write_text(json.dumps(llava))
        write_json(tmp / "WORLD.json", record)
    return out


def read_scenes(world: str | Path, split: str | None = None) -> list[tuple[str, Scene, bool]]:
    """(image path relative to the world, scene, contains a held-out combination) for the split (None: all)"""
    path = Path(world) / "scenes.jsonl"
    out = []
    for lineno, r in enumerate(read_jsonl(path), 1):
        try:
            if split in (None, r["split"]):
                out.append((str(r["image"]), Scene.from_json(r), bool(r["heldout_combo"])))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: row {lineno}: not a scene ({type(err).__name__}: {str(err)[:200]})") from None
    return out
