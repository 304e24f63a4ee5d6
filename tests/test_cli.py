"""The command line as a user meets it: real processes, exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.cli import main
from indexer.cli.args import EXIT_INDEX, EXIT_OK, EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "indexer" / "sample_photos"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indexer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, cwd=REPO)


def test_user_errors_are_messages_with_exit_codes(tmp_path, capsys):
    db = str(tmp_path / "idx")
    assert main(["index", str(tmp_path / "missing"), "--db", db]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", "a dog", "--db", db]) == EXIT_INDEX
    assert "no index at" in capsys.readouterr().err
    assert main(["search", "--db", db]) == EXIT_USAGE
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--db", db]) == EXIT_USAGE
    assert "no image files found" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--images", str(tmp_path), "--captions", str(tmp_path / "nope.tsv")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse usage errors exit 2 too
        main(["search", "-k", "many"])
    assert exc.value.code == 2


def test_a_file_error_no_command_foresaw_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    """The last net under every command: an OSError that reaches the command line (a full disk, a folder made
    unreadable meanwhile) prints its message, naming the file, and exits 1."""
    from indexer.cli import everyday

    def unreadable(args):  # noqa: ANN001, ANN202 - stands in for a command whose file went away
        raise PermissionError(13, "Permission denied", str(tmp_path / "idx" / "images.faiss"))

    monkeypatch.setattr(everyday, "cmd_stats", unreadable)
    assert main(["stats", "--db", str(tmp_path / "idx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pixquery: error: [Errno 13] Permission denied") and "images.faiss" in err
    assert "Traceback" not in err


def test_index_search_stats_end_to_end_with_native_encoder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ["beagle_dog_on_table_01.jpg", "pizza_pepperoni_01.jpg", "surfer_on_wave_01.jpg",
                 "yellow_sports_car_01.jpg", "elephant_closeup_01.jpg"]:
        shutil.copy(SAMPLES / name, photos / name)
    (photos / "broken.jpg").write_bytes(b"this is not a jpeg")
    env = {"PIXQUERY_DB": str(tmp_path / "idx")}  # the environment variable picks the index location

    r = run("index", str(photos), "--json", env=env)
    assert r.returncode == EXIT_OK, r.stderr
    summary = json.loads(r.stdout)
    assert summary["new"] == 5 and summary["skipped"] == 1 and summary["total_images"] == 5
    assert "Traceback" not in r.stderr

    r = run("search", "a surfer riding a wave", "-k", "3", "--json", env=env)
    assert r.returncode == EXIT_OK, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["results"][0]["path"]).name == "surfer_on_wave_01.jpg"
    assert len(out["results"]) == 3 and out["results"][0]["score"] >= out["results"][1]["score"]

    r = run("search", "--image", str(SAMPLES / "woman_with_dog_on_grass_01.jpg"), "-k", "1", env=env)
    assert r.returncode == EXIT_OK and "beagle_dog_on_table_01.jpg" in r.stdout

    r = run("stats", "--skipped", "--json", env=env)
    stats = json.loads(r.stdout)
    assert stats["images"] == 5 and stats["skipped"] == 1 and stats["encoder"]["name"] == "native:effl0-minilm-v1"
    assert stats["skipped_files"][0]["path"].endswith("broken.jpg")

    r = run("search", "a dog", "--encoder", "openclip:ViT-B-32/laion2b_s34b_b79k", env=env)
    assert r.returncode == EXIT_INDEX and "was built with encoder" in r.stderr and "Traceback" not in r.stderr

    r = run("search", "", env=env)
    assert r.returncode == EXIT_USAGE and "empty" in r.stderr


def test_latency_summary_reports_percentiles_and_the_slowest_queries():
    from indexer.lab.bench_latency import latency_summary

    timed = [(float(ms), f"q{ms % 7}") for ms in range(1, 101)]  # 1..100 ms
    out = latency_summary(timed, slowest=2)
    assert out["n"] == 100 and out["p50_ms"] == 50.5
    assert out["p99_ms"] == 100.0  # index int(0.99 * 100) = 99: the slowest of 100
    assert out["slowest"] == [[100.0, "q2"], [99.0, "q1"]]
    with pytest.raises(ValueError):
        latency_summary([])
