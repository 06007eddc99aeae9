"""User registries over the built-in one: the override order and its notices, one schema with file:line errors
for every file, `srkit weights add/remove` and their name clashes, and models used by the names users gave them.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import TRAIN_CROP, smooth_image
from PIL import Image
from typer.testing import CliRunner

from srkit import api, registry, toml_text
from srkit.cli import app
from srkit.train.recipes.naosd import NAOSDRecipe

FAST = "realesr-animevideov3"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh SRKIT_HOME of this test's own (the session's shared cache must never get a user registry)."""
    home = tmp_path / "home"
    monkeypatch.setenv("SRKIT_HOME", str(home))
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


def entry(name: str, url: str) -> str:
    return f'[{name}]\nengine = "{FAST}"\nlicence = "MIT"\nfiles = [\n  {{ path = "m.pth", url = "{url}" }},\n]\n'


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def builtin_line(name: str) -> int:
    return toml_text.line_of(registry.REGISTRY_FILE.read_text(), name)


# ---------------------------------------------------------------------------------------------------------------
# Layers


def test_later_layers_override_earlier_ones_with_a_notice(home, tmp_path, monkeypatch, capsys):
    mine = write(
        home / "weights.toml",
        entry("mine", "https://home/m.pth") + "\n" + entry("realesrnet-x4plus", "https://home/n.pth"),
    )
    team = write(
        tmp_path / "team" / "weights.toml", "# the team's models\n" + entry("mine", "https://team/m.pth")
    )
    reg = registry.load_registry()
    assert reg.layers == (registry.REGISTRY_FILE, mine)
    assert reg.entries["mine"].files[0].sources[0].location == "https://home/m.pth"
    assert reg.entries["mine"].where == f"{mine}:1" and not reg.entries["mine"].builtin
    assert reg.entries["realesrnet-x4plus"].origin == mine  # a built-in name, overridden by yours
    assert (
        reg.entries["realesr-animevideov3"].builtin
        and len(reg.entries) == len(tomllib.loads(registry.REGISTRY_FILE.read_text())) + 1
    )
    builtin = f"{registry.REGISTRY_FILE}:{builtin_line('realesrnet-x4plus')}"
    notices = capsys.readouterr().err.splitlines()
    assert notices == [f"notice: {mine}:8: 'realesrnet-x4plus' overrides the entry of {builtin}"]

    monkeypatch.setenv("SRKIT_REGISTRY", str(team))  # the team's file is read last
    reg = registry.load_registry()
    assert reg.layers == (registry.REGISTRY_FILE, mine, team)
    assert reg.entries["mine"].files[0].sources[0].location == "https://team/m.pth"
    assert f"notice: {team}:2: 'mine' overrides the entry of {mine}:1" in capsys.readouterr().err.splitlines()

    monkeypatch.setenv("SRKIT_REGISTRY", str(tmp_path / "absent.toml"))
    assert registry.load_registry().entries["mine"].origin == mine  # a missing team file hides nothing else
    assert f"SRKIT_REGISTRY names {tmp_path / 'absent.toml'}, which does not exist" in capsys.readouterr().err


def test_a_relative_path_is_read_from_the_registry_files_folder(
    home, tmp_path, monkeypatch, tiny_compact_pth
):
    team = write(tmp_path / "share" / "team.toml", f"""
        [shared]
        engine = "{FAST}"
        path = "models"
        files = [{{ path = "tiny.pth" }}]
        """)  # fmt: skip
    monkeypatch.setenv("SRKIT_REGISTRY", str(team))
    with pytest.raises(
        registry.WeightsError, match=r"\(.*team.toml:1\) are in .*share/models, which lacks tiny.pth"
    ):
        registry.resolve("shared")
    copy(tiny_compact_pth, tmp_path / "share" / "models" / "tiny.pth")
    assert registry.resolve("shared") == tmp_path / "share" / "models" / "tiny.pth"
    assert registry.verify("shared") == [("tiny.pth", "unverified")]  # no digest recorded: nothing to check


def test_the_registry_is_read_again_when_a_file_changes(home):
    assert "mine" not in registry.load_registry().entries
    write(home / "weights.toml", entry("mine", "https://home/m.pth"))
    assert "mine" in registry.load_registry().entries


# ---------------------------------------------------------------------------------------------------------------
# One schema for every file: a problem is one line naming the file and the line


GOOD_FILE = '  { path = "m.pth", url = "https://x/m.pth" },'
HEAD = f'[x]\nengine = "{FAST}"\n'
MALFORMED = {  # text, line of the problem, what the message says
    "toml syntax": ("[x]\nengine = \n", 2, "not valid TOML"),
    "unknown field": (HEAD + f'sha265 = "0"\nfiles = [\n{GOOD_FILE}\n]\n', 3, "unknown field 'sha265'"),
    "no engine": (f"# mine\n[x]\nfiles = [\n{GOOD_FILE}\n]\n", 2, "'x' has no 'engine'"),
    "engine type": (f"[x]\nengine = 3\nfiles = [\n{GOOD_FILE}\n]\n", 2, "engine of 'x' must be a string"),
    "format": (HEAD + f'format = "zip"\nfiles = [\n{GOOD_FILE}\n]\n', 3, "format must be one of"),
    "no files": (HEAD + "files = []\n", 3, "'x' lists no files"),
    "bad digest": (
        HEAD + f'files = [\n{GOOD_FILE}\n  {{ path = "b.pth", sha256 = "abc", url = "https://x/b" }},\n]\n',
        5,
        "sha256 of file b.pth of 'x' must be 64 lowercase hex digits",
    ),
    "no source": (HEAD + 'files = [\n  { path = "m.pth" },\n]\n', 4, "m.pth has no source"),
    "escaping path": (
        HEAD + 'path = "/models"\nfiles = [\n  { path = "../m.pth" },\n]\n',
        5,
        "file paths are relative to the entry's folder",
    ),
    "two alt kinds": (
        HEAD + 'files = [\n  { path = "m.pth", alt = [{ url = "u", hf = "a:b" }] },\n]\n',
        4,
        "exactly one of url, hf or pypi",
    ),
    "hf without path": (
        HEAD + 'files = [\n  { path = "m.pth", hf = "org/repo" },\n]\n',
        4,
        'hf sources are written "repo:path"',
    ),
    "unknown base": (HEAD + f'base = "nothing"\nfiles = [\n{GOOD_FILE}\n]\n', 3, "names base 'nothing'"),
    "name": (
        f'["my model"]\nengine = "{FAST}"\nfiles = [\n{GOOD_FILE}\n]\n',
        1,
        "'my model' is not a usable",
    ),
    "duplicate file": (HEAD + f"files = [\n{GOOD_FILE}\n{GOOD_FILE}\n]\n", 4, "lists m.pth twice"),
}


@pytest.mark.parametrize("layer", ["home", "team"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_entry_is_one_line_naming_file_and_line(case, layer, home, tmp_path, monkeypatch):
    text, line, problem = MALFORMED[case]
    path = write(home / "weights.toml" if layer == "home" else tmp_path / "team.toml", text)
    if layer == "team":
        monkeypatch.setenv("SRKIT_REGISTRY", str(path))
    with pytest.raises(registry.WeightsError) as caught:
        registry.load_registry()
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: ") and problem in message and "\n" not in message


def test_the_cli_reports_a_malformed_registry_in_one_line(home, tmp_path):
    path = write(home / "weights.toml", MALFORMED["unknown field"][0])
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    for args in (
        ["weights", "list"],
        ["models"],
        ["upscale", str(image), "--model", "x"],
        ["weights", "verify", "x"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), args
        assert f"{path}:3: unknown field 'sha265'" in result.output and "Traceback" not in result.output, args


# ---------------------------------------------------------------------------------------------------------------
# Editing a user registry


def test_tables_are_replaced_and_removed_keeping_the_rest_byte_for_byte():
    text = '# my models\n[a]\nengine = "x"  # note\n\n# b is the team\'s\n["b.c"]\nengine = "y"\n'
    fields = {
        "engine": 'say "hi" \\ ünï\x7f',
        "n": 3,
        "on": True,
        "files": [{"path": "p", "size": 1}],
        "tags": ["u"],
    }
    edited = toml_text.replace_table(text, "a", toml_text.dump_table("a", fields))
    assert edited.startswith("# my models\n[a]\n")
    assert edited.endswith('\n\n# b is the team\'s\n["b.c"]\nengine = "y"\n')
    assert tomllib.loads(edited)["a"] == fields
    assert toml_text.replace_table(text, "b.c", None) == '# my models\n[a]\nengine = "x"  # note\n'
    appended = toml_text.replace_table(text, "d", toml_text.dump_table("d", {"engine": "z"}))
    assert appended == text + '\n[d]\nengine = "z"\n'
    assert toml_text.line_of(text, "b.c") == 6 and toml_text.line_of(text, "a", "engine") == 3


def test_a_checkpoint_added_by_name_lists_upscales_and_verifies(home, tmp_path, tiny_compact_pth):
    checkpoint = copy(tiny_compact_pth, tmp_path / "models" / "tiny.pth")
    added = invoke("weights", "add", "tiny", "--path", str(checkpoint), "--engine", FAST, "--sha256", "auto",
                   "--licence", "CC-BY-4.0")  # fmt: skip
    assert added.exit_code == 0, added.output
    written = tomllib.loads((home / "weights.toml").read_text())["tiny"]
    assert (
        written["engine"] == FAST
        and written["path"] == str(tmp_path / "models")
        and written["licence"] == "CC-BY-4.0"
    )
    assert written["files"] == [{"path": "tiny.pth", "size": checkpoint.stat().st_size,
                                 "sha256": registry.sha256_of(checkpoint)}]  # fmt: skip

    row = next(line for line in invoke("models").output.splitlines() if line.strip("│ ").startswith("tiny "))
    assert "x4" in row and "local" in row and "CC-BY-4.0" in invoke("models", "tiny").output  # licence: details
    image = tmp_path / "in.png"
    Image.new("RGB", (10, 6), (90, 140, 200)).save(image)
    upscaled = invoke("upscale", str(image), "-o", str(tmp_path / "out.png"), "--model", "tiny")
    assert upscaled.exit_code == 0, upscaled.output
    by_name = np.asarray(Image.open(tmp_path / "out.png"))
    by_path = api.load_engine(FAST, weights=checkpoint, device="cpu", log=lambda m: None).upscale(
        Image.open(image)
    )
    assert by_name.shape == (24, 40, 3) and np.array_equal(by_name, np.asarray(by_path))

    verified = invoke("weights", "verify", "tiny")
    assert verified.exit_code == 0 and verified.output.split() == ["tiny/tiny.pth:", "ok"]
    checkpoint.write_bytes(b"x" + checkpoint.read_bytes()[1:])  # same size, another digest
    assert invoke("weights", "verify", "tiny").output.split() == ["tiny/tiny.pth:", "mismatch"]
    with pytest.raises(registry.WeightsError, match="reads its files from .*models, not from the cache"):
        registry.import_file("tiny", checkpoint)
    checkpoint.unlink()
    missing = CliRunner().invoke(app, ["upscale", str(image), "--model", "tiny"])
    assert (
        missing.exit_code == 2
        and f"({home / 'weights.toml'}:1) are in {tmp_path / 'models'}, which lacks tiny.pth"
        in missing.output
    )


def test_add_refuses_clashing_names_and_remove_only_touches_user_entries(
    home, tmp_path, monkeypatch, tiny_compact_pth
):
    checkpoint = copy(tiny_compact_pth, tmp_path / "tiny.pth")
    add = ["weights", "add", "--path", str(checkpoint), "--engine", FAST]
    assert invoke(*add[:2], "mine", *add[2:]).exit_code == 0

    def refused(*args: str) -> str:
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    assert f"'mine' is already in {home / 'weights.toml'}:1; pass --replace" in refused(
        *add[:2], "mine", *add[2:]
    )
    assert invoke(*add[:2], "mine", *add[2:], "--replace", "--licence", "MIT").exit_code == 0
    assert tomllib.loads((home / "weights.toml").read_text())["mine"]["licence"] == "MIT"
    assert "'realesrnet-x4plus' is a built-in model with its own engine" in refused(
        *add[:2], "realesrnet-x4plus", *add[2:]
    )
    assert "'sd21-base' is a built-in entry" in refused(*add[:2], "sd21-base", *add[2:])
    assert "engine 'tagger' is not a model" in refused(
        "weights", "add", "t", "--path", str(checkpoint), "--engine", "tagger"
    )
    assert "the gdpo engine's main checkpoint is a model folder" in refused(
        "weights", "add", "g", "--path", str(checkpoint), "--engine", "gdpo"
    )
    assert "not a usable entry name" in refused(*add[:2], "../up", *add[2:])
    assert "(no srkit_export.json); pass --engine" in refused("weights", "add", "e", "--path", str(tmp_path))

    unread = invoke(*add[:2], "elsewhere", *add[2:], "--registry", str(tmp_path / "other.toml"))
    assert f"srkit does not read {tmp_path / 'other.toml'} yet; set SRKIT_REGISTRY=" in unread.output
    assert "[elsewhere]" in (tmp_path / "other.toml").read_text()

    team = write(tmp_path / "team.toml", entry("shared", "https://team/m.pth"))
    monkeypatch.setenv("SRKIT_REGISTRY", str(team))
    assert f"'shared' is defined in {team}:1, which is read after" in refused(
        *add[:2], "shared", *add[2:], "--replace"
    )
    assert "'gdpo' is a built-in entry; only your own entries can be removed" in refused(
        "weights", "remove", "gdpo"
    )
    assert f"'shared' is defined in {team}:1, not in {home / 'weights.toml'}" in refused(
        "weights", "remove", "shared"
    )
    assert invoke("weights", "remove", "shared", "--registry", str(team)).exit_code == 0
    assert team.read_text() == "" and "shared" not in registry.load_registry().entries
    assert invoke("weights", "remove", "mine").exit_code == 0
    assert "mine" not in registry.load_registry().entries and checkpoint.is_file()  # the weights stay


# ---------------------------------------------------------------------------------------------------------------
# A trained model by name (issue 18, "what it must show" 2)


def test_a_naosd_export_added_by_name_upscales_benchmarks_and_verifies_offline(
    training_files, home, tmp_path, monkeypatch
):
    """From a fresh SRKIT_HOME, offline: the tiny model `srkit finetune --recipe naosd` exports is added with a name
    and a path only (its export config gives engine and licence); its engine's other weights (`sd21-text`) come from
    a team registry named by SRKIT_REGISTRY, so nothing is read from the cache."""
    run = tmp_path / "runs" / "naosd"
    trained = invoke("finetune", "--recipe", "naosd", "--data", str(training_files["hr"]), "-o", str(run),
                     "--base", str(training_files["base"]), "--text", str(training_files["text"]),
                     "--crop", str(TRAIN_CROP), "--steps", "1", "--checkpoint-every", "1", "-O", "lambda_lpips=0",
                     "--device", "cpu")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    export = run / "export"
    assert json.loads((export / registry.EXPORT_CONFIG).read_text()) == {
        "engine": "naosd", "recipe": "naosd", "base": str(training_files["base"]), "licence": NAOSDRecipe.licence,
        "format": "diffusers-folder",
    }  # fmt: skip

    team = tmp_path / "team" / "weights.toml"
    monkeypatch.setenv("SRKIT_REGISTRY", str(team))
    text_side = ["--path", str(training_files["text"]), "--replace", "--registry", str(team)]
    shared = invoke("weights", "add", "sd21-text", *text_side)
    assert shared.exit_code == 0, shared.output
    added = invoke("weights", "add", "my-naosd", "--path", str(export), "--sha256", "auto")
    assert added.exit_code == 0, added.output
    entry = registry.load_registry().entries["my-naosd"]
    assert (entry.engine, entry.licence, entry.location) == ("naosd", NAOSDRecipe.licence, export)
    assert entry.origin == home / "weights.toml"
    assert {f.path for f in entry.files} == {
        "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    } and all(f.sha256 for f in entry.files)  # fmt: skip

    listed = invoke("models")
    row = next(line for line in listed.output.splitlines() if line.strip("│ ").startswith("my-naosd "))
    assert "x4" in row and "local" in row
    names = [line.strip("│ ").split(" ")[0] for line in listed.output.splitlines()]
    assert "my-naosd" in names and "sd21-text" not in names  # an override of a built-in entry is no model
    assert "weights: my-naosd (local), sd21-text (local)" in invoke("models", "my-naosd").output

    image = tmp_path / "in.png"
    Image.fromarray((smooth_image(20, 24) * 255).round().astype(np.uint8)).save(image)
    by_name = invoke(
        "upscale", str(image), "-o", str(tmp_path / "by_name.png"), "--model", "my-naosd", "--offline"
    )
    assert by_name.exit_code == 0, by_name.output
    by_path = invoke("upscale", str(image), "-o", str(tmp_path / "by_path.png"), "--model", "naosd",
                     "--weights", str(export), "--offline")  # fmt: skip
    assert by_path.exit_code == 0, by_path.output
    assert Image.open(tmp_path / "by_name.png").size == (96, 80)
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "by_name.png")), np.asarray(Image.open(tmp_path / "by_path.png"))
    )

    for folder, size in (("hr", 64), ("lr", 16)):
        (tmp_path / "set" / folder).mkdir(parents=True)
        for index in range(2):
            pixels = Image.fromarray((smooth_image(64, 64, seed=index) * 255).round().astype(np.uint8))
            pixels.resize((size, size), Image.Resampling.BICUBIC).save(
                tmp_path / "set" / folder / f"img{index}.png"
            )
    pairs = ["--lr", str(tmp_path / "set" / "lr"), "--hr", str(tmp_path / "set" / "hr")]
    scored = invoke(
        "benchmark", "--model", "my-naosd", *pairs, "--metrics", "psnr,ssim", "-o", str(tmp_path / "b"),
        "--no-baseline",
    )
    assert scored.exit_code == 0, scored.output
    with open(tmp_path / "b" / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["model"], r["image"]) for r in rows] == [("my-naosd", "img0"), ("my-naosd", "img1")]
    assert all(5 < float(r["psnr_y"]) < 60 for r in rows)

    verified = invoke("weights", "verify", "my-naosd")
    assert verified.exit_code == 0 and verified.output.count(": ok") == 5, verified.output
    assert not (home / "weights").exists()  # nothing was fetched into the cache
