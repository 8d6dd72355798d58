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


def test_renamed_flags_keep_old_scripts_working_and_say_so(capsys):
    """One name per meaning: --crop (the training crop) and --painted-size (a painted square's side);
    the old --patch / --patch-size still parse, to the same settings, with one line saying the new name."""
    from ssl_em.demo import build_parser

    new = build_parser().parse_args(["--crop", "1,64,64", "--painted-size", "32"])
    assert capsys.readouterr().err == ""
    old = build_parser().parse_args(["--patch", "1,64,64", "--patch-size", "32"])
    err = capsys.readouterr().err.splitlines()
    assert (old.crop, old.painted_size) == (new.crop, new.painted_size) == ("1,64,64", 32)
    assert err == ["ssl-em demo: --patch is now --crop; the old name will go in a later release",
                   "ssl-em demo: --patch-size is now --painted-size; the old name will go in a later release"]
    assert "--patch-size" not in build_parser().format_help()
