"""Weights registry: the table is complete, sources are tried in order, downloads resume and verify."""

from __future__ import annotations

import hashlib
import http.server
import threading
import typing
from pathlib import Path

import pytest
import torch

from srkit import registry
from srkit.engines.base import get_engine, model_names


def test_every_entry_is_complete():
    reg = registry.load_registry()
    for name, entry in reg.entries.items():
        assert entry.files, name
        assert entry.licence and entry.licence != "unknown", name
        for file in entry.files:
            assert file.sources or entry.status in ("unreleased", "manual"), f"{name}/{file.path} has no source"
            assert entry.status in ("released", "unreleased", "manual")
            assert entry.obtain or entry.status == "released", f"{name} must say how to obtain it"
            assert file.sha256 is None or len(file.sha256) == 64


def test_every_model_names_registered_weights():
    reg = registry.load_registry()
    for name in model_names():
        try:
            _, spec = get_engine(name)
        except ImportError:
            continue
        for key in spec.weights:
            assert key in reg.entries, f"model {name} needs unregistered weights {key}"


def test_embedded_default_builds_offline_from_the_wheel(srkit_home):
    path = registry.resolve("realesrgan-x4plus", offline=True, log=lambda m: None)
    assert path.suffix == ".safetensors" and path.is_relative_to(srkit_home)
    assert registry.is_cached(registry.load_registry().entry("realesrgan-x4plus"))
    assert [status for _, status in registry.verify("realesrgan-x4plus")] == ["unverified"]


def test_offline_without_a_local_source_says_what_to_run():
    with pytest.raises(registry.WeightsError, match=r"srkit weights pull realesrgan-x2plus"):
        registry.resolve("realesrgan-x2plus", offline=True)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; the first request for a file is cut short to force a resume."""

    cut_once: typing.ClassVar[set[str]] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = Path(self.directory, self.path.lstrip("/")).read_bytes()
        start = int(self.headers.get("Range", "bytes=0-").split("=")[1].split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path not in self.cut_once:
            self.cut_once.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(root), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_and_verifies(server, tmp_path):
    root, base = server
    payload = bytes(range(256)) * 4000
    (root / "w.bin").write_bytes(payload)
    dest = tmp_path / "cache" / "w.bin"
    digest = hashlib.sha256(payload).hexdigest()
    with pytest.raises(registry.WeightsError, match="stopped at .* run the command again to resume"):
        registry.download(f"{base}/w.bin", dest, digest)  # the connection drops half-way
    assert not dest.exists() and dest.with_name("w.bin.part").exists()
    registry.download(f"{base}/w.bin", dest, digest)  # resumes from the .part file
    assert dest.read_bytes() == payload and not dest.with_name("w.bin.part").exists()


def test_download_with_a_wrong_hash_is_rejected(server, tmp_path):
    root, base = server
    (root / "x.bin").write_bytes(b"abc" * 100)
    _RangeHandler.cut_once.add("/x.bin")
    with pytest.raises(registry.WeightsError, match="checksum mismatch"):
        registry.download(f"{base}/x.bin", tmp_path / "x.bin", "0" * 64)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()


def test_import_verifies_the_registered_hash(tmp_path):
    fake = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}}, fake)  # the right shape of file, not the bytes
    with pytest.raises(registry.WeightsError, match="sha256"):
        registry.import_file("realesrgan-x2plus", fake)


def test_import_of_a_file_without_hash_lands_in_the_cache(tmp_path, srkit_home):
    fake = tmp_path / "RealESRNet_x4plus.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}}, fake)
    dest = registry.import_file("realesrnet-x4plus", fake)
    assert dest == srkit_home / "weights" / "realesrnet-x4plus" / "RealESRNet_x4plus.pth"
    assert dest.read_bytes() == fake.read_bytes()
    dest.unlink()


def test_import_checks_the_format_and_the_keys_before_accepting_a_file(tmp_path, srkit_home):
    from safetensors.torch import save_file

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about OSEDiff")
    safetensors = tmp_path / "osediff.safetensors"
    save_file({"w": torch.zeros(1)}, str(safetensors))
    other = tmp_path / "other.pkl"
    torch.save({"state_dict_unet": {}, "params": {}}, other)
    listed = tmp_path / "list.pkl"
    torch.save([torch.zeros(1)], listed)
    cases = [
        (notes, "notes.txt is in no format srkit knows, not a PyTorch checkpoint"),
        (safetensors, "is a safetensors file, not a PyTorch checkpoint"),
        (other, r"lacks the key\(s\) state_dict_vae, rank_unet, rank_vae .*found: params, state_dict_unet"),
        (listed, "holds a list, not a dictionary of weights"),
    ]
    for source, message in cases:
        with pytest.raises(registry.WeightsError, match=message) as info:
            registry.import_file("osediff", source)
        assert "\n" not in str(info.value)
    assert not (srkit_home / "weights" / "osediff").exists()
    good = tmp_path / "mine.pkl"
    torch.save({"state_dict_unet": {}, "state_dict_vae": {}, "rank_unet": 4, "rank_vae": 4}, good)
    dest = registry.import_file("osediff", good)
    assert dest == srkit_home / "weights" / "osediff" / "osediff.pkl"
    dest.unlink()


def test_a_folder_import_checks_every_file(tmp_path):
    folder = tmp_path / "vae16"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(registry.WeightsError, match="config.json is in no format srkit knows, not a JSON file"):
        registry.import_file("vae-kl-f8-d16", folder)
    (folder / "config.json").unlink()
    with pytest.raises(registry.WeightsError, match="is not a complete 'vae-kl-f8-d16' folder: it lacks config.json"):
        registry.import_file("vae-kl-f8-d16", folder)


def test_a_missing_model_names_every_file_it_still_needs_at_once():
    from srkit.api import load_engine

    with pytest.raises(registry.WeightsError) as info:
        load_engine("realesr-general-x4v3", offline=True)
    message = str(info.value)
    assert message.startswith("2 weight file(s) are not in the cache") and "\n" not in message
    assert "realesr-general-x4v3/realesr-general-x4v3.pth" in message
    assert "realesr-general-wdn-x4v3/realesr-general-wdn-x4v3.pth" in message
    assert "srkit weights pull realesr-general-x4v3 realesr-general-wdn-x4v3" in message
    entries = [registry.load_registry().entry(name) for name in get_engine("osediff")[1].weights]
    with pytest.raises(registry.WeightsError) as info:
        load_engine("osediff", offline=True)
    assert str(info.value).startswith(f"{sum(len(e.files) for e in entries)} weight file(s)")
    assert all(f"{e.name}/{f.path}" in str(info.value) for e in entries for f in e.files)


def test_the_embedded_default_is_built_without_any_network_attempt(tmp_path, monkeypatch):
    """The official URL is the first source in the table, yet nothing touches the network unless pulled."""
    import urllib.error
    import urllib.request

    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "fresh-home"))
    attempts: list[str] = []

    def no_network(request, *args, **kwargs):
        attempts.append(request.full_url)
        raise urllib.error.URLError("this test has no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = registry.resolve("realesr-animevideov3", offline=False, log=lambda m: None)
    assert path.name == "realesr-animevideov3.converted.safetensors" and attempts == []
    entry = registry.load_registry().entry("realesr-animevideov3")
    pulled = registry.resolve("realesr-animevideov3", offline=False, pull=True, log=lambda m: None)
    assert pulled == path and attempts == [entry.files[0].sources[0].url()]  # tried first, then the wheel's copy
    official = registry.entry_dir(entry) / entry.files[0].path  # as a successful pull leaves it
    torch.save({"params": {"body.0.weight": torch.zeros(1)}}, official)
    assert registry.resolve("realesr-animevideov3", offline=False, log=lambda m: None) == official
    assert len(attempts) == 1


def test_formats_are_told_from_content(tmp_path):
    from safetensors.torch import save_file

    from srkit.checkpoints import CheckpointError, check_file, expected_format, sniff

    (tmp_path / "x.param").write_text("7767517\n3 3\nInput data 0 1 data\n")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "renamed.pth"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "real.bin")
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert [sniff(tmp_path / n) for n in ("x.param", "renamed.pth", "real.bin", "config.json")] == [
        "ncnn-param", "safetensors", "pickle", "json"]
    assert expected_format("model.param", "ncnn") == "ncnn-param" and expected_format("model.bin", "ncnn") is None
    assert expected_format("unet/diffusion_pytorch_model.bin", "diffusers-folder") == "pickle"
    with pytest.raises(CheckpointError, match="renamed.pth is a safetensors file, not a PyTorch checkpoint"):
        check_file(tmp_path / "renamed.pth", "pickle")
    check_file(tmp_path / "renamed.pth", "safetensors", ("w",))
