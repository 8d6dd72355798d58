"""``ssl-em demo`` through the real CLI (hidden tiny mode: toy network, small phantoms, a few steps)."""

from __future__ import annotations

import json

from ssl_em.cli import main as cli_main
from ssl_em.demo import pick_labelled


def test_demo_runs_through_the_cli_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--tiny", "--steps", "12", "--pretrain-steps", "6", "--val-every", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    last = [line for line in printed.strip().splitlines() if line.strip()]
    assert "| lora |" in printed and last[-4].startswith("lora vs best of scratch")
    # the three lines a person reads first: the winner, whether pretraining paid beyond the spread, the files
    assert last[-3].startswith("winner on 25% sections: ") and " ± " in last[-3]
    assert last[-2].startswith(("pretraining pays here", "pretraining is ahead", "pretraining does not pay"))
    assert last[-1].startswith("files: ") and str(out / "overlays.png") in last[-1]
    doc = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in doc["records"]} == {"lora", "scratch"}
    for name in ("results.md", "label_efficiency.png", "overlays.png", "pretrain/reconstruction.png"):
        assert (out / name).exists()


def test_demo_reports_bad_arguments_in_one_line(capsys):
    assert cli_main(["demo", "--labels", "x.npz:mito"]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_labelled_raw_is_the_data_spec_from_the_labels_file():
    data = ["/d/stack2.npz:raw", "/d/stack1.npz:raw"]
    assert pick_labelled(data, "/d/stack1.npz:mito") == "/d/stack1.npz:raw"
    assert pick_labelled(data, "/d/other.h5:/labels") == data[0]
