"""Tests of the Fu-world generator and the font split (tasks/data/fu_world/, tasks/data/fonts.py).

They draw with the operating system's CJK fonts and skip when none are installed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from saofu.errors import SaofuError
from tasks.data.fonts import (
    FontFace,
    design_lineage,
    discover_fonts,
    face_charset,
    font_group,
    split_fonts,
)
from tasks.data.fu_world import (
    MANIFEST_COLUMNS,
    WorldConfig,
    generate_world,
    is_same_world,
    plan_world,
    world_folder_name,
)

SMALL = {"n": 60, "seed": 3, "image_size": 32}


@pytest.fixture(scope="module")
def faces() -> list[FontFace]:
    # No skip: `make test` installs the fonts, and without them this fails with the install hint.
    return discover_fonts()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory, faces: list[FontFace]) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig(**SMALL))
    return out


@pytest.fixture(scope="module")
def merchant_world(tmp_path_factory: pytest.TempPathFactory, faces: list[FontFace]) -> Path:
    out = tmp_path_factory.mktemp("merchant") / "w"
    generate_world(out, WorldConfig(n=60, seed=5, image_size=40, merchant=True))
    return out


def read_manifest(world: Path) -> list[dict[str, str]]:
    with (world / "manifest.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def tree_bytes(world: Path) -> dict[str, bytes]:
    return {p.relative_to(world).as_posix(): p.read_bytes() for p in world.rglob("*.png")}


# ---- determinism -----------------------------------------------------------------------------


def test_same_config_gives_identical_bytes(small_world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_world(again, WorldConfig(**SMALL))
    assert (again / "manifest.csv").read_bytes() == (small_world / "manifest.csv").read_bytes()
    assert (again / "world.json").read_bytes() == (small_world / "world.json").read_bytes()
    assert tree_bytes(again) == tree_bytes(small_world)


def test_other_seed_gives_other_bytes(small_world: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_world(other, WorldConfig(**{**SMALL, "seed": SMALL["seed"] + 1}))
    a, b = tree_bytes(small_world), tree_bytes(other)
    assert set(a.values()).isdisjoint(b.values())


def test_worker_processes_give_serial_bytes(faces: list[FontFace], tmp_path: Path) -> None:
    cfg = WorldConfig(n=24, seed=11, image_size=32)
    generate_world(tmp_path / "serial", cfg, workers=1)
    generate_world(tmp_path / "pool", cfg, workers=2)
    assert tree_bytes(tmp_path / "serial") == tree_bytes(tmp_path / "pool")


def test_png_has_no_metadata(small_world: Path) -> None:
    first = next(small_world.rglob("*.png"))
    with Image.open(first) as img:
        assert img.info == {} or set(img.info) <= {"dpi"}
        assert b"tIME" not in first.read_bytes()


# ---- layout, classes, manifest ---------------------------------------------------------------


def test_every_split_has_every_class(small_world: Path) -> None:
    rows = read_manifest(small_world)
    seen = {(r["split"], r["label"]) for r in rows}
    assert seen == {(s, c) for s in ("train", "val", "test") for c in ("fu", "not_fu")}
    world = json.loads((small_world / "world.json").read_text(encoding="utf-8"))
    assert world["classes"] == ["fu", "not_fu"]
    assert sum(sum(c.values()) for c in world["counts"].values()) == SMALL["n"] == len(rows)


def test_manifest_matches_files(small_world: Path) -> None:
    rows = read_manifest(small_world)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    for r in rows:
        path = small_world / r["path"]
        assert r["path"] == f"{r['split']}/{r['label']}/{path.name}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        assert r["source"] == "generated"
        if r["label"] == "fu":
            assert r["char"] == "福"
        else:
            assert r["char"] != "福"


def test_image_size_is_honoured(small_world: Path) -> None:
    for path in list(small_world.rglob("*.png"))[:10]:
        with Image.open(path) as img:
            assert img.size == (32, 32) and img.mode == "RGB"


def test_merchant_switch_adds_the_class(merchant_world: Path) -> None:
    rows = read_manifest(merchant_world)
    assert {r["label"] for r in rows} == {"fu", "not_fu", "fu_merchant"}
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {"fu", "not_fu", "fu_merchant"}
        assert (merchant_world / split / "fu_merchant").is_dir()
    assert all(
        r["style"] == "merchant" and r["char"] == "福" for r in rows if r["label"] == "fu_merchant"
    )
    with Image.open(next((merchant_world / "train" / "fu_merchant").glob("*.png"))) as img:
        assert img.size == (40, 40)


def test_progress_reports_until_done(faces: list[FontFace], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    generate_world(
        tmp_path / "p", WorldConfig(n=40, seed=1, image_size=24), lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (40, 40)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ---- fonts ----------------------------------------------------------------------------------


def test_test_fonts_never_in_train_or_val(small_world: Path) -> None:
    world = json.loads((small_world / "world.json").read_text(encoding="utf-8"))
    train_groups = set(world["fonts"]["train_groups"])
    test_groups = set(world["fonts"]["test_groups"])
    assert train_groups and test_groups and train_groups.isdisjoint(test_groups)
    for r in read_manifest(small_world):
        if not r["font_group"]:  # a texture: no character, no font
            continue
        expected = test_groups if r["split"] == "test" else train_groups
        assert r["font_group"] in expected, r


def test_split_keeps_designs_and_lineages_together(faces: list[FontFace]) -> None:
    train, test = split_fonts(faces)
    assert train and test
    by_path: dict[str, set[bool]] = {}
    for f in train + test:
        by_path.setdefault(f.path, set()).add(f in test)
    assert all(len(sides) == 1 for sides in by_path.values()), "a .ttc straddles the split"
    assert {f.group for f in train}.isdisjoint({f.group for f in test})
    assert {design_lineage(f.group) for f in train}.isdisjoint(
        {design_lineage(f.group) for f in test}
    )
    # regional variants of one design share one group
    for f in faces:
        if "Noto Sans" in f.family and "CJK" in f.family:
            assert f.group == "noto-sans-cjk"
        if "UKai" in f.family:
            assert f.group == "ukai"


def test_no_fonts_names_the_folders_and_packages(tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match=re.escape(str(tmp_path)) + ".*fonts-noto-cjk"):
        discover_fonts([str(tmp_path)])


def test_every_face_draws_fu(faces: list[FontFace]) -> None:
    assert all("福" in face_charset(f) for f in faces)
    assert faces == sorted(faces, key=lambda f: (f.group, f.path, f.index))


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("NotoSansCJK-Bold.ttc", "noto-sans-cjk"),
        ("NotoSansMonoCJKsc-Regular.otf", "noto-sans-cjk"),
        ("NotoSerifCJKtc-Regular.otf", "noto-serif-cjk"),
        ("ukai.ttc", "ukai"),
        ("uming.ttc", "uming"),
        ("wqy-zenhei.ttc", "wqy-zenhei"),
        ("wqy-microhei.ttc", "wqy-microhei"),
        ("gkai00mp.ttf", "gkai"),
        ("ipagp.ttf", "ipa-gothic"),
        ("ipamp.ttf", "ipa-mincho"),
        ("VL-PGothic-Regular.ttf", "vlgothic"),
        ("setofont.ttf", "seto"),
        ("KleeOne-SemiBold.ttf", "klee"),
        ("LXGWWenKaiMono-Light.ttf", "lxgw-wenkai"),
        ("DroidSansFallbackFull.ttf", "droid"),
        ("SomeNewFont-Bold.ttf", "somenewfont"),
    ],
)
def test_font_group_from_file_name(name: str, group: str) -> None:
    assert font_group(f"/usr/share/fonts/x/{name}") == group


def fake_faces(groups: list[str]) -> list[FontFace]:
    return [FontFace(path=f"/f/{g}.ttf", index=0, family=g, group=g) for g in groups]


def test_default_split_holds_out_the_ming_lineage_and_shares_can_hold_out_more() -> None:
    groups = [
        "noto-sans-cjk",
        "noto-serif-cjk",
        "ukai",
        "gkai",
        "uming",
        "lxgw-wenkai",
        "klee",
        "seto",
        "wqy-zenhei",
        "ipa-mincho",
        "ipa-gothic",
        "droid",
        "vlgothic",
    ]
    train, test = split_fonts(fake_faces(groups))  # 11 lineages, 10% -> 1 held out
    assert {f.group for f in test} == {"uming"}
    assert {"ukai", "gkai", "seto", "noto-serif-cjk", "ipa-mincho"} <= {f.group for f in train}
    train, test = split_fonts(fake_faces(groups), test_share=0.3)  # 3 held out, in preference order
    assert {f.group for f in test} == {"ukai", "gkai", "uming", "seto"}
    styles_train = {f.group for f in train}
    assert {"noto-sans-cjk", "noto-serif-cjk", "lxgw-wenkai", "klee"} <= styles_train


def test_split_falls_back_to_hash_order_and_stays_non_empty() -> None:
    train, test = split_fonts(fake_faces(["alpha", "beta", "gamma"]))
    assert train and test
    assert split_fonts(fake_faces(["alpha", "beta", "gamma"])) == (train, test)


def test_split_refuses_bad_requests() -> None:
    with pytest.raises(SaofuError, match="at least 2"):
        split_fonts(fake_faces(["noto-sans-cjk"]))
    with pytest.raises(SaofuError, match="no-such-font"):
        split_fonts(fake_faces(["ukai", "uming"]), test_groups=["no-such-font"])
    with pytest.raises(SaofuError, match="every font design"):
        split_fonts(fake_faces(["ukai", "uming"]), test_groups=["ukai", "uming"])


def test_naming_one_group_holds_out_its_lineage() -> None:
    _train, test = split_fonts(fake_faces(["ukai", "gkai", "noto-sans-cjk"]), test_groups=["gkai"])
    assert {f.group for f in test} == {"ukai", "gkai"}


# ---- bad input -------------------------------------------------------------------------------


def test_too_small_n_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match="too small"):
        plan_world(WorldConfig(n=5))
    with pytest.raises(SaofuError, match="too small"):
        generate_world(tmp_path / "tiny", WorldConfig(n=5))
    assert not (tmp_path / "tiny").exists()


def test_unknown_test_group_is_refused(faces: list[FontFace], tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match="no-such-font"):
        generate_world(tmp_path / "w", WorldConfig(n=30, test_groups=("no-such-font",)))


def test_folder_with_other_world_is_refused(small_world: Path, tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match=r"different world.*seed"):
        generate_world(small_world, WorldConfig(**{**SMALL, "seed": 99}))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(SaofuError, match="no world.json"):
        generate_world(stranger, WorldConfig(**SMALL))


@pytest.mark.timeout(120)
def test_worlds_of_two_sizes_generated_by_name_keep_their_own_folders(small_world: Path, tmp_path: Path) -> None:
    """A project's world from before the default size changed stays where it was, untouched, beside the new one."""
    import shutil

    old = tmp_path / world_folder_name(SMALL["n"], SMALL["seed"], SMALL["image_size"])
    shutil.copytree(small_world, old)
    bigger = WorldConfig(**{**SMALL, "image_size": 40})
    new = tmp_path / world_folder_name(bigger.n, bigger.seed, bigger.image_size)
    generate_world(new, bigger)
    assert new != old and is_same_world(new, bigger) and is_same_world(old, WorldConfig(**SMALL))
    assert tree_bytes(old) == tree_bytes(small_world)
    assert world_folder_name(60, 3, 96, "merchant") == "fu_world_n60_s3_96px_merchant"


def test_same_world_may_be_regenerated_in_place(faces: list[FontFace], tmp_path: Path) -> None:
    cfg = WorldConfig(n=30, seed=2, image_size=24)
    generate_world(tmp_path / "w", cfg)
    before = tree_bytes(tmp_path / "w")
    generate_world(tmp_path / "w", cfg)
    assert tree_bytes(tmp_path / "w") == before
    assert is_same_world(tmp_path / "w", cfg)
    assert not is_same_world(tmp_path / "w", WorldConfig(n=30, seed=3, image_size=24))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"splits": (0.8, 0.2, 0.0)}, "splits"),
        ({"class_weights": {"fu": 1.0, "not_fu": 1.0, "fu_merchant": 1.0}}, "class_weights"),
        ({"lookalike_share": 0.9, "texture_share": 0.2}, "lookalike_share"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SaofuError, match=field):
        WorldConfig(**kwargs)


def test_config_round_trips_through_json() -> None:
    cfg = WorldConfig(
        n=100,
        merchant=True,
        test_groups=("ukai",),
        class_weights={"fu": 1, "not_fu": 1, "fu_merchant": 1},
    )
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
