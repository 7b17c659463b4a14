"""The `valora` command line, in process."""

import gc

import pytest

from serve.cli import main


def test_info_reports_the_embedded_default_or_says_it_is_random(capsys, monkeypatch, tmp_path):
    import serve.cli as cli
    main(["info"])
    out, err = capsys.readouterr()
    trained = (cli.CHECKPOINTS / "default" / "config.json").exists()
    assert "valora-tiny" in out and "parameters: " in out
    import jax, jaxlib, flax
    assert f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, cuda plugin " in out
    assert "backend reference; attention backend reference" in out
    assert "backends: LoRA reference (auto), attention reference (auto), on JAX platform cpu" in err
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
    (["info", "--backend", "pallas"], "LoRA backend 'pallas' runs compiled GPU kernels"),
    (["generate", "--prompt", "hi", "--attention", "pallas"], "attention backend 'pallas' runs compiled GPU kernels"),
    (["serve", "--decode-loop", "0", "--port", "0"], "decode_loop must be >= 1, got 0"),
])
def test_bad_input_exits_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_serve_calibrates_ours_before_taking_traffic(capsys, monkeypatch):
    """`valora serve` with policy ours measures every mode with a probe over the embedded adapters,
    then serves from a clean engine (no requests, steps or metrics left from the probe), with what
    start-up built frozen out of Python's garbage collections."""
    import serve.cli as cli
    from serve import server
    assert list((cli.CHECKPOINTS / "adapters").glob("*/adapter.json")), "the embedded adapters are committed"
    started = {}

    class Recorder:                          # the server, not started
        def __init__(self, app, host, port):
            started["app"] = app

        def run(self):
            started["frozen"] = gc.get_freeze_count()

    monkeypatch.setattr(server, "Server", Recorder)
    main(["serve", "--calibration-requests", "4", "--port", "0"])
    engine = started["app"].state.service.engine
    assert "calibrated on" in capsys.readouterr().err
    assert engine.cost.observed > 0 and all(len(obs) for obs in engine.cost._obs.values())
    assert not engine.has_work and not engine.request_metrics and not engine.step_metrics
    assert engine.allocator.num_free == engine.config.num_pages - 1
    assert started["frozen"] > 0 and gc.get_freeze_count() == 0
