"""Tag prompts for OSEDiff/NAOSD/GDPO-SR and `srkit tag`, with a tiny random RAM + DAPE in the official layouts.

The prompt each image gets is upstream's composition of its tags ("{tags}, {prompt},"), embedded by the SD text
encoder; `--tagger auto` takes DAPE when its files are cached and otherwise says once what is lost; `--tagger none`
stays available.  `srkit tag` writes one .txt per image and reports a corrupt file without stopping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared_data
from tiny_models import CROSS_DIM, TINY_MODELS, tiny_tagger
from tiny_sd import write_text_side
from typer.testing import CliRunner

from srkit import registry
from srkit.cli import app
from srkit.common import build_options
from srkit.diffusion.text import QUALITY_PROMPT, TextEncoder, compose_prompt
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.prompting import chosen_tagger
from srkit.taggers import NO_TAGS_NOTICE, TAGGER_WEIGHTS


@pytest.fixture(scope="module")
def tagger_files(tmp_path_factory) -> dict[str, Path]:
    return tiny_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture(scope="module")
def text_side(tmp_path_factory) -> Path:
    return write_text_side(tmp_path_factory.mktemp("text"), CROSS_DIM)


@pytest.fixture()
def private_home(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own: the session cache must not gain tagger files other tests would pick up."""
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def cache_tagger(files: dict[str, Path]) -> None:
    """Put the tiny tagger files where the registry looks (their hashes are not the published files')."""
    entries = registry.load_registry().entries
    for name, path in files.items():
        target = registry.entry_dir(entries[name]) / entries[name].files[0].path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def engine(name: str, tmp_path: Path, tagger_files, text_side, tagger: str):
    engine_class, _ = get_engine(name)
    paths, options = TINY_MODELS[name](tmp_path)
    options.pop("prompt_embeds")
    weights = {**paths, **tagger_files, "sd21-text": text_side}
    values = build_options(engine_class.options_class, {**options, "tagger": tagger})
    return engine_class.from_weights(WeightsSet(weights), torch.device("cpu"), torch.float32, values)


def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 3, 32, 32, generator=gen)
    batch[1] *= 0.2
    return batch


@pytest.mark.parametrize(("name", "user"), [("osediff", ""), ("gdpo", QUALITY_PROMPT)])
def test_each_image_is_prompted_with_its_tags_as_upstream(name, user, tmp_path, tagger_files, text_side) -> None:
    tagged = engine(name, tmp_path, tagger_files, text_side, "dape")
    prepared = tagged.prepare(images())
    tags = tagged.prompter.tagger.tags(prepared)
    assert tags[0] and tags[0] != tags[1]  # the tiny tagger finds tags, and not the same ones everywhere
    texts = tagged.prompter.texts(tags)
    assert texts == [f"{t}, {user}," for t in tags] == [compose_prompt(t, user) for t in tags]
    tagged.condition(images(), prepared)
    encoder = TextEncoder.from_folder(text_side)
    torch.testing.assert_close(tagged.prompt_embeds, torch.cat([encoder(t) for t in texts]))
    out = tagged.upscale(images(), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 128, 128)
    plain = engine(name, tmp_path / "plain", tagger_files, text_side, "none")
    assert plain.prompter.tagger is None and plain.prompt_embeds.shape[0] == 1


def test_auto_tagger_is_dape_when_cached_and_says_what_is_lost_otherwise(tagger_files, private_home) -> None:
    assert chosen_tagger("auto") == "none"
    engine_class, _ = get_engine("osediff")
    options = build_options(engine_class.options_class, {})
    assert not set(TAGGER_WEIGHTS["dape"]) & set(engine_class.weights_for(options))
    cache_tagger(tagger_files)
    assert chosen_tagger("auto") == "dape" and chosen_tagger("none") == "none"
    assert set(TAGGER_WEIGHTS["dape"]) <= set(engine_class.weights_for(options))
    with pytest.raises(ValueError, match="cannot take image tags"):
        chosen_tagger("dape", "prompts.safetensors")
    assert "srkit weights pull dape" in NO_TAGS_NOTICE


def test_srkit_tag_writes_one_txt_per_image_and_reports_a_corrupt_file(tagger_files, tmp_path, private_home) -> None:
    cache_tagger(tagger_files)
    lr = shared_data("realsr", "test_LR")
    folder = tmp_path / "lr"
    folder.mkdir()
    for path in sorted(lr.glob("*.png"))[:8]:
        shutil.copyfile(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = CliRunner().invoke(app, ["tag", str(folder), "--write-txt", "-o", str(tmp_path / "tags"), "--offline"])
    assert result.exit_code == 1
    assert "broken.png" in result.stderr and result.stderr.count("failed") == 1
    written = sorted(p.name for p in (tmp_path / "tags").glob("*.txt"))
    assert written == sorted(f"{p.stem}.txt" for p in folder.glob("*.png") if p.name != "broken.png")
    for txt in (tmp_path / "tags").glob("*.txt"):
        names = [t for t in txt.read_text().strip().split(", ") if t]
        assert set(names) <= {"sky", "tree", "house", "dog", "road", "flower", "car", "person"}
    assert len(result.stdout.strip().splitlines()) == 8


def test_srkit_tag_without_weights_is_one_line() -> None:
    result = CliRunner().invoke(app, ["tag", os.devnull, "--offline"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "ram-swin-large-14m" in result.stderr
