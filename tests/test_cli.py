"""The one command line: shipped configs by name from any folder, the trainers under ``hyper-prag train``, one
flag name per concept across every verb (the parser walk), one-line errors during training, GPU defaults."""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from hyper_prag import api, benchmark, demo, model
from hyper_prag.augment import AugmentConfig
from hyper_prag.cli import COMMANDS, TRAINERS, _HelpFormatter, build_parser, main
from hyper_prag.errors import HyperPragError
from hyper_prag.flags import RENAMED, config_argv
from hyper_prag.paths import CONFIGS, config_file, shipped_configs
from hyper_prag.store import LoraStore
from hyper_prag.training.hypernet import lightning_precision, main as hypernet_main, training_device

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------------------------------- shipped configs


def test_a_config_is_found_by_name_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file("tiny", "hypernet") == CONFIGS / "hypernet" / "tiny.yaml"
    assert config_file("smollm2-fastweight.yaml", "hypernet") == CONFIGS / "hypernet" / "smollm2-fastweight.yaml"
    assert config_file("tiny", "encode") == CONFIGS / "encode" / "tiny.yaml"  # the verb picks the folder
    assert config_file("configs/encode/demo.yaml", "encode") == CONFIGS / "encode" / "demo.yaml"  # a checkout path
    own = tmp_path / "tiny"
    own.write_text("limit: 1\n")
    assert config_file("tiny", "encode").resolve() == own  # a file of that name wins over the shipped one
    with pytest.raises(HyperPragError, match="smollm2-fastweight"):  # the message lists what is shipped
        config_file("nope", "hypernet")
    own.unlink()
    assert config_argv(["fit", "--config=smollm2", "-c", "tiny"], "hypernet") == [
        "fit", f"--config={CONFIGS / 'hypernet' / 'smollm2.yaml'}", "-c", str(CONFIGS / "hypernet" / "tiny.yaml")]
    assert api.load_encode_config("tiny")["model"] == "tiny"


def test_the_configs_are_package_data_and_the_checkout_folder_is_the_same():
    assert (ROOT / "configs").resolve() == CONFIGS.resolve()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hyper_prag"]
    shipped = {p.relative_to(CONFIGS.parent) for pattern in data for p in CONFIGS.parent.glob(pattern)}
    assert {p.relative_to(CONFIGS.parent) for p in CONFIGS.rglob("*.yaml")} <= shipped
    assert "tiny" in shipped_configs("hypernet") and "demo" in shipped_configs("encode")
    for path in CONFIGS.rglob("*.yaml"):  # nothing that only a checkout has
        assert "class_path: train." not in path.read_text(), path


# ------------------------------------------------------------------------------------------------- trainers


def test_train_hypernet_fits_steps_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative runs/... paths land here
    assert main(["train", "hypernet", "fit", "--config", "tiny", "--trainer.max_steps", "3",
                 "--trainer.val_check_interval", "3", "--data.embedding_cache", str(tmp_path / "emb")]) == 0
    assert list((tmp_path / "runs" / "hypernet-tiny").rglob("last.ckpt"))
    saved = next((tmp_path / "runs" / "hypernet-tiny").rglob("config.yaml")).read_text()
    assert "dtype: float32" in saved and "precision: 32-true" in saved  # auto, resolved for the CPU and recorded


def test_train_encode_and_encode_are_one_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--config", "tiny", "--limit", "2", "--chunk-size", "2", "--store", str(tmp_path / "s"),
             "--trainer.epochs", "1", "--logger", "none", "--progress", "false"]
    assert main(["train", "encode", *flags]) == 0
    assert len(LoraStore(tmp_path / "s")) == 2
    assert main(["encode", *flags, "--runner", "loop"]) == 0  # the same recipe: both found, nothing added
    assert len(LoraStore(tmp_path / "s")) == 2


def test_an_error_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "hypernet", "fit", "--config", "tiny", "--data.corpus", str(tmp_path / "missing"),
                 "--data.embedding_cache", str(tmp_path / "emb")])  # the data module's prepare_data refuses it
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("hyper-prag: error: ")
    assert main(["train", "encode", "--config", "nope"]) == 2
    assert "hyper-prag: error: no encode config 'nope'" in capsys.readouterr().err


def test_the_checkout_entry_points_still_run_with_one_line_errors():
    done = subprocess.run([sys.executable, "-m", "train.hypernet", "fit", "--config", "configs/hypernet/nope.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("hyper-prag: error: no hypernet config")
    import train.hypernet
    import train.hypernet_data

    assert train.hypernet.DivergenceGuard is not None and train.hypernet_data.lower_states is not None


# -------------------------------------------------------------------------------------------- GPU defaults


def test_device_auto_resolves_to_cuda_when_present(monkeypatch):
    assert model.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert model.resolve_device("auto") == torch.device("cuda")
    assert model.resolve_dtype("auto", "auto") == torch.bfloat16  # a bf16 GPU
    assert model.resolve_dtype("auto", training_device("cpu")) == torch.float32  # trainer.accelerator: cpu
    assert [training_device(a) for a in ("auto", "gpu", "cuda", "cpu")] == ["auto", "cuda", "cuda", "cpu"]
    assert [lightning_precision(d) for d in (torch.bfloat16, torch.float32)] == ["bf16-mixed", "32-true"]


def test_shipped_configs_default_to_the_gpu_when_present():
    for name in shipped_configs("encode"):
        assert api.load_encode_config(name)["device"] == "auto", name
    for name in shipped_configs("hypernet"):
        text = config_file(name, "hypernet").read_text()
        assert re.search(r"^  dtype: auto\b", text, re.M) and re.search(r"^  precision: null\b", text, re.M), name


@pytest.mark.parametrize("flags, dtype, precision", [
    ([], "float32", "32-true"),
    (["--model.dtype", "bfloat16"], "bfloat16", "bf16-mixed"),
    (["--model.dtype", "bfloat16", "--trainer.precision", "32-true"], "bfloat16", "32-true"),  # an explicit one stays
])
def test_the_hypernet_trainer_takes_dtype_and_precision_from_the_config(flags, dtype, precision):
    cli = hypernet_main(["--config", "tiny", "--trainer.logger", "false", *flags], run=False)
    assert cli.config.model.dtype == cli.config.data.dtype == dtype and cli.config.trainer.precision == precision
    assert cli.model.base.dtype == getattr(torch, dtype)
    assert next(cli.model.hypernet.parameters()).dtype == torch.float32  # the hypernet trains in float32


# ---------------------------------------------------------------------------------------------- parser walk

# Every verb as typed, sub-actions and the trainers included.
VERBS = ([[v] for v in COMMANDS if v not in ("store", "train")] + [["store", "verify"], ["store", "gc"]]
         + [["train", t] for t in TRAINERS if t != "hypernet"] + [["train", "hypernet", s] for s in ("fit", "validate")])
OWN_NAMES = {"--help", "--print_config"}  # argparse's and jsonargparse's own
FLAG = re.compile(r"(?<![\w.-])--[A-Za-z][\w.-]*")


def help_text(verb: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*verb, "--help"])
    assert done.value.code == 0, verb
    return capsys.readouterr().out


def test_one_visible_name_per_concept_across_every_verb(capsys):
    spellings: dict[str, dict[str, str]] = {}  # concept -> spelling -> the verb that shows it
    for verb in VERBS:
        for flag in set(FLAG.findall(help_text(verb, capsys))) - OWN_NAMES:
            name = " ".join(verb)
            if "." in flag:
                continue  # a path into the YAML: its keys are the Python names
            assert "_" not in flag, f"`hyper-prag {name}` shows {flag}: spell it with hyphens"
            assert flag not in RENAMED, f"`hyper-prag {name}` shows {flag}, now {RENAMED[flag]}"
            spellings.setdefault(flag.replace("_", "-"), {})[flag] = name
    assert {"--corpus", "--checkpoint", "--device", "--dtype", "--num-nodes"} <= set(spellings)
    assert all(len(s) == 1 for s in spellings.values()), {c: s for c, s in spellings.items() if len(s) > 1}


# The function each hand-written verb calls, and the flags named otherwise than its keyword.
FUNCTIONS = {"ask": api.ask, "evaluate": api.evaluate, "export-lora": api.export_lora, "demo": demo.run_demo,
             "make-benchmark": benchmark.make_benchmark, "augment": AugmentConfig}
KEYWORD = {"corpus": "benchmark", "checkpoint": "hypernet", "docs": "n_docs", "rewrites": "n_rewrites", "qa": "n_qa",
           "doc": "doc_id"}


def _subparser(verb: str) -> argparse.ArgumentParser:
    return build_parser(verb)._subparsers._group_actions[0].choices[verb]


def _same(shown, default) -> bool:
    if isinstance(default, (tuple, list)):
        return tuple(shown.split(",") if isinstance(shown, str) else shown) == tuple(default)
    return str(shown) == str(default)


@pytest.mark.parametrize("verb", [v for v in COMMANDS if v not in ("encode", "train")])
def test_help_shows_the_real_defaults(verb):
    parser = _subparser(verb)
    formatter = _HelpFormatter(verb)
    params = inspect.signature(FUNCTIONS[verb]).parameters if verb in FUNCTIONS else {}
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or not action.option_strings:
            continue
        shown = formatter._expand_help(action)
        assert "default: None" not in shown and shown.count("(default:") <= 1, (verb, action.option_strings, shown)
        param = params.get(KEYWORD.get(action.dest, action.dest))
        if param is None or param.default in (None, inspect.Parameter.empty):
            continue
        if action.default is None:  # the function has a value: the help must say which
            assert "default" in shown.lower(), (verb, action.option_strings, shown)
        else:  # one default, the function's: the command line must not drift from it
            assert _same(action.default, param.default), (verb, action.option_strings, action.default, param.default)


def test_old_flag_names_still_parse(capsys):
    args = build_parser("ask").parse_args(["ask", "q", "--benchmark", "squad", "--hypernet", "h.safetensors"])
    assert (args.corpus, args.checkpoint) == ("squad", "h.safetensors")
    assert "--benchmark is now --corpus" in capsys.readouterr().err
    args = build_parser("export-lora").parse_args(["export-lora", "--doc", "d", "--out", "o"])
    assert args.corpus == "fictional"  # the hidden alias leaves the default alone
