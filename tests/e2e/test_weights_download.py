"""``model.backbone_weights`` as a torchvision weights name: resolved through torchvision's weights
API to a URL, downloaded once into torch's hub cache with its sha256 prefix checked, then read from the cache;
with neither, a one-line message naming the URL and the exact path to put the file at.

A real HTTP server on 127.0.0.1 serves the file; the name -> URL step is pointed at it (nothing leaves the
machine), and TORCH_HOME is a temporary folder.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest
import torch
import torchvision

from ray_retina.config import Config, ConfigError, apply_overrides
from ray_retina.engine.restore import check_init
from ray_retina.model import backbone
from ray_retina.model.backbone import BackboneWithFPN, WeightsUnavailableError, torchvision_weights_file

NAME = "ResNet18_Weights.IMAGENET1K_V1"


class _Server:
    """``http.server`` in a thread, serving one folder on 127.0.0.1; counts the GET requests."""

    def __init__(self, folder) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(folder))
        )
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, file_name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{file_name}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A random resnet18 state dict served as ``resnet18-<sha256 prefix>.pth`` (torchvision's naming, which
    ``check_hash`` verifies), an empty TORCH_HOME, and the server."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    folder = tmp_path / "www"
    folder.mkdir()
    raw = folder / "raw.pth"
    torch.save(state, raw)
    name = f"resnet18-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    raw.rename(folder / name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    server = _Server(folder)
    yield server, name, state
    server.stop()


def test_default_url_and_cache_path_are_torchvision_s(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = backbone.weights_url("ResNet50_Weights.IMAGENET1K_V2")
    assert url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert backbone.weights_cache_path(url) == tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(ValueError, match="not a torchvision weights name"):
        backbone.weights_url("ResNet50_Weights.NO_SUCH")


def test_download_then_cache_then_offline_message(served, tmp_path, monkeypatch):
    server, file_name, state = served
    url = server.url(file_name)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / file_name

    # 1. Online: downloaded into the hub cache, through the config path (a backbone built from the name).
    monkeypatch.setattr(backbone, "weights_url", lambda name: url)
    net = BackboneWithFPN(name="resnet18", out_channels=32, weights_path=NAME)
    assert server.requests == [f"/{file_name}"]
    assert cache.is_file()
    got = net.body.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_var"):
        assert torch.equal(got[key], state[key])

    # 2. The server gone: the cache answers, no request.
    server.stop()
    assert torchvision_weights_file(NAME, url_of=lambda name: url) == cache
    assert len(server.requests) == 1

    # 3. Neither: one line saying which URL to download and the exact path to put it at.
    cache.unlink()
    with pytest.raises(WeightsUnavailableError) as err:
        torchvision_weights_file(NAME, url_of=lambda name: url)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.endswith(f"download {url} and put it at {cache}")
    assert not cache.exists()

    # ... and the run stops there at start-up, before Ray.
    cfg = apply_overrides(Config(), {"model.backbone": "resnet18", "model.backbone_weights": NAME})
    with pytest.raises(WeightsUnavailableError, match="put it at"):
        check_init(cfg)


def test_a_file_whose_hash_does_not_match_its_name_is_refused(served, tmp_path):
    server, file_name, _ = served
    wrong = "resnet18-00000000.pth"
    (server_dir := tmp_path / "www").joinpath(file_name).rename(server_dir / wrong)
    with pytest.raises(WeightsUnavailableError, match="hash"):
        torchvision_weights_file(NAME, url_of=lambda name: server.url(wrong))
    assert not (tmp_path / "torch_home" / "hub" / "checkpoints" / wrong).exists()


def test_weights_of_another_network_stop_at_start_up():
    cfg = apply_overrides(
        Config(), {"model.backbone": "resnet18", "model.backbone_weights": "ResNet50_Weights.IMAGENET1K_V2"}
    )
    with pytest.raises(ConfigError, match="are weights of resnet50, model.backbone is resnet18"):
        check_init(cfg)
