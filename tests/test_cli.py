"""The `valora` command line, in process."""

import pytest

from serve.cli import main


def test_info_reports_the_embedded_default_or_says_it_is_random(capsys, monkeypatch, tmp_path):
    import serve.cli as cli
    main(["info"])
    out = capsys.readouterr().out
    trained = (cli.CHECKPOINTS / "default" / "config.json").exists()
    assert "valora-tiny" in out and "parameters: " in out
    assert ("embedded default" in out) == trained and ("RANDOMLY INITIALISED" in out) != trained
    monkeypatch.setattr(cli, "CHECKPOINTS", tmp_path)            # no trained checkpoint there
    main(["info"])
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out


def test_generate_with_an_image(capsys, tmp_path):
    from PIL import Image
    Image.new("RGB", (50, 70), (10, 200, 30)).save(tmp_path / "img.png")
    main(["generate", "--image", str(tmp_path / "img.png"), "--prompt", "what colour?", "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert "3 generated" in err or "finish: stop" in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi", "--image", "/no/such.png"], "such.png"),
    (["generate", "--prompt", ""], "prompt"),
    (["generate", "--prompt", "hi", "--adapter", "broken"], "NAME=DIR"),
    (["info", "--model", "/no/model"], "/no/model"),
])
def test_bad_input_exits_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
