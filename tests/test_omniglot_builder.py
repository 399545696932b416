"""The mmtl_omniglot TFDS builder, finding and safely extracting its zips, the class caches."""

from __future__ import annotations

import collections
import io
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmtl_tf.data import omniglot, sources
from mmtl_tf.preprocessing import Preprocessing, preprocess_array

SMALL1 = "images_background_small1"
# The official small1 subset: 5 alphabets, 136 characters, 20 drawers each.
SMALL1_ALPHABETS = {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
SMALL1_CHARACTERS = 136


def _png_bytes(ink_pixels: int = 3) -> bytes:
    """A valid 105x105 one-bit PNG with a few ink (black) pixels."""
    image = Image.new("1", (105, 105), 1)
    for i in range(ink_pixels):
        image.putpixel((10 + i, 20), 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_zip(path: Path, members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def _valid_member(drawer: int = 1) -> str:
    return f"{SMALL1}/Greek/character03/0396_{drawer:02d}.png"


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


@pytest.fixture(autouse=True)
def _no_explicit_dir(monkeypatch):
    """A developer's own MMTL_OMNIGLOT_DIR must not change what these tests see: the folder it
    names stands in for the shared one (a clone away from ../shared, as CI may make), and the
    variable itself is unset."""
    explicit = os.environ.get(sources.ENV_VAR)
    if explicit:
        monkeypatch.setattr(sources, "shared_data_dir", lambda: Path(explicit))
    monkeypatch.delenv(sources.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def small1_zip(omniglot_zips) -> Path:
    """The official small1 zip (the test fails, naming it, when it is missing)."""
    return omniglot_zips[SMALL1]


@pytest.fixture(scope="module")
def small1_data_dir(tmp_path_factory, small1_zip) -> Path:
    """A TFDS data_dir with the small1 config built from the official zip."""
    data_dir = tmp_path_factory.mktemp("tfds_small1")
    omniglot.MmtlOmniglot(config="small1", data_dir=data_dir,
                          source_dir=small1_zip.parent).download_and_prepare()
    return data_dir


def _small1_examples(data_dir: Path) -> list[dict]:
    builder = omniglot.MmtlOmniglot(config="small1", data_dir=data_dir)
    return list(tfds.as_numpy(builder.as_dataset(split="small1", shuffle_files=False)))


def test_builder_metadata_matches_tfds_omniglot(tmp_path):
    builder = omniglot.MmtlOmniglot(config="small1", data_dir=tmp_path)
    features = builder.info.features
    assert builder.name == "mmtl_omniglot" and str(builder.version) == "1.0.0"
    assert features["label"].num_classes == 1623
    assert features["alphabet"].names == sorted(features["alphabet"].names)
    assert features["alphabet"].num_classes == 50
    assert features["image"].shape == (105, 105, 3)
    assert {c.name: c.splits for c in omniglot.MmtlOmniglot.BUILDER_CONFIGS}["all"] == (
        "train", "test", "small1", "small2"
    )


def test_small1_split_holds_5_alphabets_of_characters_with_20_drawers(small1_data_dir, small1_zip):
    examples = _small1_examples(small1_data_dir)
    assert len(examples) == SMALL1_CHARACTERS * 20
    alphabet_names = omniglot.ALPHABETS
    assert {alphabet_names[e["alphabet"]] for e in examples} == SMALL1_ALPHABETS
    drawers = collections.defaultdict(set)
    for e in examples:
        assert e["image"].shape == (105, 105, 3) and e["image"].dtype == np.uint8
        drawers[int(e["label"])].add(int(e["drawer_id"]))
    # every example's numbers are its file's: <alphabet>/characterNN/IIII_DD.png, 0-based
    with zipfile.ZipFile(small1_zip) as archive:
        named = [m.split("/")[1:] for m in archive.namelist() if m.endswith(".png")]
    from_names = {(int(file[:4]) - 1, alphabet_names.index(alphabet), int(character[-2:]) - 1,
                   int(file[5:7]) - 1) for alphabet, character, file in named}
    assert {(int(e["label"]), int(e["alphabet"]), int(e["alphabet_char_id"]), int(e["drawer_id"]))
            for e in examples} == from_names and len(named) == len(examples)
    assert len(drawers) == SMALL1_CHARACTERS
    assert all(d == set(range(20)) for d in drawers.values())
    # Global ids come from the file names: Balinese character01 is 0108 in the background set.
    balinese = alphabet_names.index("Balinese")
    first = {
        int(e["label"]) for e in examples
        if e["alphabet"] == balinese and e["alphabet_char_id"] == 0
    }
    assert first == {107}


def test_builds_are_byte_identical(small1_data_dir, small1_zip, tmp_path):
    omniglot.MmtlOmniglot(config="small1", data_dir=tmp_path,
                          source_dir=small1_zip.parent).download_and_prepare()
    pattern = "mmtl_omniglot/small1/1.0.0/*.tfrecord*"
    first = sorted(small1_data_dir.glob(pattern))
    second = sorted(tmp_path.glob(pattern))
    assert [p.name for p in first] == [p.name for p in second] and first
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))


def test_example_keys_are_unique_and_stable(small1_data_dir):
    extracted = next((small1_data_dir / "downloads" / "extracted" / "mmtl_omniglot").glob("*"))
    builder = omniglot.MmtlOmniglot(config="small1", data_dir=small1_data_dir)
    char_ids = omniglot.SPLIT_CHAR_IDS["small1"]
    keys = [key for key, _ in builder._generate_examples(extracted / SMALL1, char_ids)]
    assert keys == [key for key, _ in builder._generate_examples(extracted / SMALL1, char_ids)]
    assert len(set(keys)) == len(keys) == SMALL1_CHARACTERS * 20
    assert "0108_01" in keys


def test_evaluation_character_in_a_background_zip_stops_the_build(tmp_path):
    stray = f"{SMALL1}/Angelic/character01/0965_01.png"  # an evaluation character's id
    _write_zip(tmp_path / f"{SMALL1}.zip", {stray: _png_bytes()})
    builder = omniglot.MmtlOmniglot(config="small1", data_dir=tmp_path / "t", source_dir=tmp_path)
    with pytest.raises(sources.OmniglotSourceError, match="0965_01.png: character id 965"):
        builder.download_and_prepare()


def test_truncated_zip_is_rejected_naming_the_file(tmp_path, small1_zip):
    truncated = tmp_path / f"{SMALL1}.zip"
    truncated.write_bytes(small1_zip.read_bytes()[: 700_001])
    with pytest.raises(sources.OmniglotSourceError, match="corrupt or truncated") as err:
        sources.extract_zip(truncated, tmp_path / "extracted", SMALL1)
    assert str(truncated) in str(err.value)
    assert _files_under(tmp_path / "extracted") == []


def test_member_with_bad_crc_is_rejected_naming_it(tmp_path):
    good = _png_bytes(ink_pixels=7)
    path = tmp_path / f"{SMALL1}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_valid_member(), good)
    raw = bytearray(path.read_bytes())
    at = raw.index(good) + len(good) // 2  # a byte inside the stored member, not its header
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(sources.OmniglotSourceError, match="0396_01.png") as err:
        sources.extract_zip(path, tmp_path / "extracted", SMALL1)
    assert "corrupt" in str(err.value) and str(path) in str(err.value)
    assert _files_under(tmp_path / "extracted") == []


@pytest.mark.parametrize(
    "member",
    ["../evil.png", f"{SMALL1}/../../evil.png", "/tmp/evil.png", f"{SMALL1}\\..\\..\\evil.png"],
)
def test_member_escaping_the_target_is_rejected_and_nothing_written(tmp_path, member):
    work = tmp_path / "work"
    work.mkdir()
    path = _write_zip(work / f"{SMALL1}.zip", {_valid_member(): _png_bytes(), member: _png_bytes()})
    target = work / "deep" / "extracted"
    with pytest.raises(sources.OmniglotSourceError, match="escapes the target") as err:
        sources.extract_zip(path, target, SMALL1)
    assert str(path) in str(err.value)
    assert _files_under(tmp_path) == [path]
    assert not Path("/tmp/evil.png").exists()


def test_symlink_member_is_rejected(tmp_path):
    link = f"{SMALL1}/Greek/character03/0396_02.png"
    path = _write_zip(tmp_path / f"{SMALL1}.zip", {_valid_member(): _png_bytes()}, symlinks=(link,))
    with pytest.raises(sources.OmniglotSourceError, match="symbolic link"):
        sources.extract_zip(path, tmp_path / "extracted", SMALL1)
    assert _files_under(tmp_path / "extracted") == []


@pytest.mark.parametrize(
    "member, data, message",
    [
        (_valid_member(drawer=2), b"GIF89a not a png at all", "not a PNG"),
        ("__MACOSX/._0396_01.png", b"\x00\x05\x16\x07", "not an image of the Omniglot layout"),
        (f"{SMALL1}/Greek/character03/notes.txt", b"hello", "not an image of the Omniglot layout"),
        (f"{SMALL1}/Greek/character03/0396_21.png", b"", "not an image of the Omniglot layout"),
    ],
)
def test_member_that_is_not_an_omniglot_png_is_rejected(tmp_path, member, data, message):
    path = _write_zip(tmp_path / f"{SMALL1}.zip", {_valid_member(): _png_bytes(), member: data})
    with pytest.raises(sources.OmniglotSourceError, match=message) as err:
        sources.extract_zip(path, tmp_path / "extracted", SMALL1)
    assert member in str(err.value) and str(path) in str(err.value)
    assert _files_under(tmp_path / "extracted") == []


def test_complete_extraction_is_reused_and_published_atomically(tmp_path, monkeypatch):
    members = {_valid_member(d): _png_bytes(ink_pixels=d) for d in (1, 4, 9)}
    path = _write_zip(tmp_path / f"{SMALL1}.zip", members)
    layout = sources.extract_zip(path, tmp_path / "extracted", SMALL1)
    names = sorted(p.name for p in _files_under(layout))
    assert names == ["0396_01.png", "0396_04.png", "0396_09.png"]
    assert [p.name for p in (tmp_path / "extracted").iterdir()] == [layout.parent.name]

    def must_not_extract(*args):
        raise AssertionError("a complete extraction should have been reused")

    monkeypatch.setattr(sources, "_extract_checked", must_not_extract)
    assert sources.extract_zip(path, tmp_path / "extracted", SMALL1) == layout


def test_nothing_found_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "shared_data_dir", lambda: tmp_path / "no_shared")
    asked = []

    def offline(url):
        asked.append(url)
        raise ConnectionError("network unreachable")

    with pytest.raises(sources.OmniglotSourceError) as err:
        sources.locate_zip("images_evaluation", download=offline)
    message = str(err.value)
    assert asked == [sources.DOWNLOAD_URL.format(stem="images_evaluation")]
    shared = str(tmp_path / "no_shared")
    for expected in (sources.ENV_VAR, "source_dir", shared, asked[0], "unreachable"):
        assert expected in message


@pytest.mark.parametrize("kind", ["missing", "empty", "other_files"])
def test_explicit_dir_without_the_zip_is_an_error_not_a_fallback(tmp_path, monkeypatch, kind):
    explicit = tmp_path / "chosen"
    if kind != "missing":
        explicit.mkdir()
    if kind == "other_files":
        (explicit / "images_background.zip").write_bytes(b"")
    monkeypatch.setattr(sources, "shared_data_dir", lambda: pytest.fail("fell back to shared"))
    monkeypatch.setenv(sources.ENV_VAR, str(explicit))
    with pytest.raises(sources.OmniglotSourceError) as err:
        sources.locate_zip(SMALL1, download=lambda url: pytest.fail("fell back to download"))
    message = str(err.value)
    assert str(explicit) in message and sources.ENV_VAR in message
    expected = {
        "missing": "does not exist",
        "empty": "is empty",
        "other_files": "it holds: images_background.zip",
    }
    assert expected[kind] in message


def test_env_var_dir_wins_over_shared_folder_and_argument_wins_over_env(tmp_path, monkeypatch):
    shared, from_env, from_arg = tmp_path / "shared", tmp_path / "env", tmp_path / "arg"
    for folder in (shared, from_env, from_arg):  # locating only looks for the file name
        folder.mkdir()
        (folder / f"{SMALL1}.zip").write_bytes(folder.name.encode())
    monkeypatch.setattr(sources, "shared_data_dir", lambda: shared)
    assert sources.locate_zip(SMALL1) == shared / f"{SMALL1}.zip"
    monkeypatch.setenv(sources.ENV_VAR, str(from_env))
    assert sources.locate_zip(SMALL1) == from_env / f"{SMALL1}.zip"
    assert sources.locate_zip(SMALL1, source_dir=from_arg) == from_arg / f"{SMALL1}.zip"


def test_class_cache_is_grouped_by_character_in_drawer_order(small1_data_dir, small1_zip):
    prep = Preprocessing(image_size=28, ink_as_one=True)
    classes = omniglot.load_omniglot_classes("small1", prep, data_dir=small1_data_dir)
    assert classes.images.shape == (SMALL1_CHARACTERS * 20, 28, 28, 1)
    assert classes.images.dtype == np.float32
    assert classes.num_classes == SMALL1_CHARACTERS and np.all(classes.counts == 20)
    assert np.all(np.diff(classes.class_ids) > 0) and classes.class_ids.dtype == np.int64
    assert {classes.group_names[g] for g in classes.groups} == SMALL1_ALPHABETS
    # Class 0 is character 0108 (Balinese character01): its rows are the drawers 01..20 in order.
    assert classes.class_ids[0] == 107
    with zipfile.ZipFile(small1_zip) as archive:
        for drawer in range(1, 21):
            with archive.open(f"{SMALL1}/Balinese/character01/0108_{drawer:02d}.png") as f:
                expected = preprocess_array(np.asarray(Image.open(f).convert("L")), prep)
            np.testing.assert_allclose(classes.images[drawer - 1], expected, atol=1e-6)


def test_class_cache_polarity_follows_ink_as_one(small1_data_dir):
    ink = omniglot.load_omniglot_classes("small1", Preprocessing(20, True), small1_data_dir)
    paper = omniglot.load_omniglot_classes("small1", Preprocessing(20, False), small1_data_dir)
    assert ink.images.shape == (SMALL1_CHARACTERS * 20, 20, 20, 1)
    assert np.median(ink.images) == 0.0 and ink.images.mean() < 0.2 and ink.images.max() == 1.0
    np.testing.assert_allclose(paper.images, 1.0 - ink.images, atol=1e-6)
    cache = small1_data_dir / omniglot.CACHE_DIR_NAME
    assert {"small1_20_ink1.npz", "small1_20_ink0.npz"} <= {p.name for p in cache.iterdir()}


def test_class_cache_is_reused_on_the_next_call(small1_data_dir, monkeypatch):
    prep = Preprocessing(image_size=24, ink_as_one=True)
    first = omniglot.load_omniglot_classes("small1", prep, data_dir=small1_data_dir)
    cache = small1_data_dir / omniglot.CACHE_DIR_NAME / "small1_24_ink1.npz"
    written = cache.stat().st_mtime_ns
    monkeypatch.setattr(omniglot, "_read_classes", lambda *a, **k: pytest.fail("cache not reused"))
    second = omniglot.load_omniglot_classes("small1", prep, data_dir=small1_data_dir)
    assert cache.stat().st_mtime_ns == written
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.class_ids, first.class_ids)
    assert second.group_names == first.group_names and len(second.group_names) == 50
    assert [p.name for p in cache.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_unknown_omniglot_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'validation'.*small1"):
        omniglot.load_omniglot_classes("validation", Preprocessing(), data_dir=tmp_path)


def test_generic_loader_groups_a_mocked_tfds_dataset_by_label(tmp_path):
    prep = Preprocessing(image_size=16, ink_as_one=False)
    policy = tfds.testing.MockPolicy.USE_CODE  # no mnist metadata offline: generate from code
    with tfds.testing.mock_data(num_examples=37, policy=policy):
        classes = omniglot.load_class_images("mnist", "train", prep, data_dir=tmp_path)
        builder = tfds.builder("mnist", data_dir=tmp_path)
        labels = [int(e["label"]) for e in tfds.as_numpy(builder.as_dataset(split="train"))]
    expected = collections.Counter(labels)
    assert classes.images.shape == (37, 16, 16, 1) and classes.images.dtype == np.float32
    assert classes.class_ids.tolist() == sorted(expected)
    assert classes.counts.tolist() == [expected[c] for c in sorted(expected)]
    assert np.all(classes.groups == -1) and classes.group_names == ()
    starts = np.concatenate([[0], np.cumsum(classes.counts)[:-1]])
    assert classes.offsets.tolist() == starts.tolist()


def test_generic_loader_names_an_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="no_such_set_xyz.*tfds.list_builders"):
        omniglot.load_class_images("no_such_set_xyz", "train", Preprocessing(), data_dir=tmp_path)


@pytest.mark.slow
def test_full_train_split_has_964_characters_of_30_alphabets(tmp_path, omniglot_zips):
    classes = omniglot.load_omniglot_classes("train", Preprocessing(28, True), data_dir=tmp_path,
                                             source_dir=omniglot_zips["images_background"].parent)
    assert classes.images.shape == (19280, 28, 28, 1)
    assert classes.num_classes == 964 and np.all(classes.counts == 20)
    assert classes.class_ids.tolist() == list(range(964))
    assert len(set(classes.groups.tolist())) == 30
    assert os.path.isfile(tmp_path / omniglot.CACHE_DIR_NAME / "train_28_ink1.npz")
