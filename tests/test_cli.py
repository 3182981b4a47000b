"""``vla-pruner`` argument handling and the CPU-safe engine defaults (no engine started)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from tests.tiny_config import vision_config
from vllm_vla_pruner import cli
from vllm_vla_pruner.server_defaults import (
    PREFILL_PROMPTS,
    batched_tokens,
    cpu_safe_engine_args,
    cpu_safe_env,
    engine_defaults,
    flag_value,
    has_flag,
)


def write_config(tmp_path: Path, dtype: str = "float32", n_visual_side: int = 4) -> Path:
    cfg = {
        "model_type": "openvla",
        "torch_dtype": dtype,
        **vision_config(8 * n_visual_side),
        "text_config": {"vocab_size": 1000, "max_position_embeddings": 2048},
        "norm_stats": {"a": {"action": {"q01": [0.0] * 7}}, "b": {"action": {"q01": [0.0] * 3}}},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def vllm_parse(argv: list[str]):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


def test_defaults_for_float32_checkpoint(tmp_path: Path):
    d = write_config(tmp_path)
    args = cpu_safe_engine_args(d)
    ns = vllm_parse([str(d), *args])
    assert ns.dtype == "float32"
    # 1 BOS + 16 visual + 256 text + 7 action = 280 -> 384
    assert ns.max_model_len == 384
    assert ns.enforce_eager is True
    assert ns.enable_prefix_caching is False
    assert ns.enable_chunked_prefill is False
    assert ns.max_num_batched_tokens == PREFILL_PROMPTS * 384
    assert ns.block_size == 32
    assert ns.limit_mm_per_prompt == {"image": 1}


def test_bf16_checkpoint_keeps_auto_dtype(tmp_path: Path):
    d = write_config(tmp_path, dtype="bfloat16", n_visual_side=16)
    args = cpu_safe_engine_args(d)
    assert not has_flag(args, "--dtype")
    assert flag_value(args, "--max-model-len") == "640"  # 1 + 256 + 256 + 7 = 520


@pytest.mark.parametrize(
    ("user", "attr", "value"),
    [
        (["--dtype", "bfloat16"], "dtype", "bfloat16"),
        (["--dtype=float16"], "dtype", "float16"),
        (["--max-model-len", "4096"], "max_model_len", 4096),
        (["--max_model_len=1k"], "max_model_len", 1000),
        (["--no-enforce-eager"], "enforce_eager", False),
        (["--enable-prefix-caching"], "enable_prefix_caching", True),
        (["--enable-chunked-prefill"], "enable_chunked_prefill", True),
        (["--block-size", "64"], "block_size", 64),
        (["--max-num-batched-tokens", "999"], "max_num_batched_tokens", 999),
    ],
)
def test_user_flag_wins(tmp_path: Path, user: list[str], attr: str, value):
    d = write_config(tmp_path)
    ns = vllm_parse([str(d), *cpu_safe_engine_args(d, user)])
    assert getattr(ns, attr) == value


def test_batched_tokens_follow_user_max_len_and_seqs(tmp_path: Path):
    d = write_config(tmp_path)
    ns = vllm_parse([str(d), *cpu_safe_engine_args(d, ["--max-model-len", "8192"])])
    assert ns.max_num_batched_tokens == PREFILL_PROMPTS * 8192
    ns = vllm_parse([str(d), *cpu_safe_engine_args(d, ["--max-num-seqs=2"])])
    assert ns.max_num_batched_tokens == 2 * 384  # never more than max_num_seqs prompts


def test_batched_tokens_rule():
    assert batched_tokens(384) == PREFILL_PROMPTS * 384
    assert batched_tokens(384, max_num_seqs=1) == 384
    assert batched_tokens(16, max_num_seqs=256) == 256  # vLLM: at least max_num_seqs
    assert batched_tokens(384, given=999) == 999  # the user's value wins...
    assert batched_tokens(384, given=100) == 384  # ...down to one whole prompt per step


def test_cli_and_llm_forms_are_one_table(tmp_path: Path):
    """``vla-pruner serve``'s flags and the in-process engine's keywords set the same values."""
    from vllm_vla_pruner.engine.local import engine_kwargs

    d = write_config(tmp_path)
    ns = vllm_parse([str(d), *cpu_safe_engine_args(d, ["--max-num-seqs", "4"])])
    kwargs = engine_kwargs(d, max_num_seqs=4)
    rows = engine_defaults(json.loads((d / "config.json").read_text()), max_num_seqs=4)
    assert {r.name for r in rows} >= {"max_model_len", "max_num_batched_tokens", "dtype"}
    for row in rows:
        assert getattr(ns, row.name) == kwargs[row.name] == row.value, row.name
        assert row.why


def test_openvla_hook_applies_the_same_rule(tiny_ckpt: Path):
    """Plain ``vllm serve`` of an OpenVLA checkpoint gets the batched-token value the other
    launchers set, and the features pruning cannot live with switched off."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_vla_pruner.engine.local import engine_kwargs
    from vllm_vla_pruner.patches.engine_args import constrain

    kwargs = engine_kwargs(tiny_ckpt)
    args = EngineArgs(model=str(tiny_ckpt), max_model_len=kwargs["max_model_len"])
    constrain(args)
    assert args.max_num_batched_tokens == kwargs["max_num_batched_tokens"]
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is False
    user = EngineArgs(model=str(tiny_ckpt), max_model_len=512, max_num_batched_tokens=600)
    changed = constrain(user)
    assert user.max_num_batched_tokens == 600  # a user value that fits is kept
    assert not any("max_num_batched_tokens" in c for c in changed)


def test_no_config_still_safe(tmp_path: Path):
    args = cpu_safe_engine_args(tmp_path / "missing")
    assert "--enforce-eager" in args and "--no-enable-chunked-prefill" in args
    assert not has_flag(args, "--max-model-len")


def test_env_defaults_keep_user_values():
    env = {"VLLM_PLUGINS": "other", "VLLM_CPU_KVCACHE_SPACE": "4"}
    cpu_safe_env(env)
    assert env["VLLM_PLUGINS"] == "other,vla_pruner"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["HF_HUB_OFFLINE"] == "1"
    env = {"VLLM_PLUGINS": "vla_pruner"}
    assert cpu_safe_env(env)["VLLM_PLUGINS"] == "vla_pruner"


def test_build_serve_args_parse_in_vllm(tmp_path: Path):
    d = write_config(tmp_path)
    argv = cli.build_serve_args(str(d), 8011, "127.0.0.1", ["--max-num-seqs", "4"])
    ns = vllm_parse(argv)
    assert (ns.model_tag, ns.port, ns.host, ns.max_num_seqs) == (str(d), 8011, "127.0.0.1", 4)


def _capture(monkeypatch) -> list:
    """Replace every subcommand's run with a recorder."""
    seen: list = []
    fakes = [
        dataclasses.replace(cmd, run=lambda a, e: seen.append((a, e)) or 0)
        for cmd in cli.SUBCOMMANDS
    ]
    monkeypatch.setattr(cli, "SUBCOMMANDS", fakes)
    return seen


def test_serve_passthrough(monkeypatch):
    seen = _capture(monkeypatch)
    assert cli.main(["serve", "ck", "--port", "9", "--max-num-seqs", "4"]) == 0
    args, extra = seen[-1]
    assert (args.model, args.port, extra) == ("ck", 9, ["--max-num-seqs", "4"])
    cli.main(["serve", "--port", "9", "ck", "--served-model-name", "ck"])
    assert seen[-1][0].model == "ck" and seen[-1][1] == ["--served-model-name", "ck"]


def test_serve_option_before_model_refused(monkeypatch, capsys):
    _capture(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--max-num-seqs", "4", "ck"])
    assert "positional" in capsys.readouterr().err


def test_checkpoint_args(monkeypatch):
    seen = _capture(monkeypatch)
    cli.main(["checkpoint", "--preset", "tiny", "--out", "x", "--seed", "3"])
    a, extra = seen[-1]
    assert (a.preset, a.out, a.seed, extra) == ("tiny", "x", 3, [])
    with pytest.raises(SystemExit):
        cli.main(["checkpoint", "--preset", "tiny", "--out", "x", "--bogus"])


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "checkpoint" in out and "serve" in out


def test_demo_options_reach_the_demo_in_order():
    from vllm_vla_pruner.cli import build_parser

    argv = ["demo", "--episodes", "1", "--tasks", "drawer-open-v3", "--verbose"]
    args, extra = build_parser().parse_known_args(argv)
    assert args.command == "demo" and extra == argv[1:]


QUIET_ENV = ("VLLM_LOGGING_LEVEL", "PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL")


def test_benchmarks_are_quiet_unless_verbose(monkeypatch):
    """`vla-pruner bench X ...` hands X its options without --verbose; without the flag the
    third-party log levels are set for this process and the engine's (the user's values win)."""
    from vllm_vla_pruner import cli
    from vllm_vla_pruner.research.bench import cli as bench_cli

    seen: list[list[str]] = []
    module = type(cli)("fake_bench")
    module.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "fake_bench", module)
    monkeypatch.setitem(bench_cli.BENCHMARKS, "engine", ("fake_bench:main", "test"))
    for key in QUIET_ENV:  # set, then removed: the teardown restores each key's absence
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    vllm_logger = logging.getLogger("vllm")
    monkeypatch.setattr(vllm_logger, "level", vllm_logger.level)  # restored after the test
    assert cli.main(["bench", "engine", "--batch", "1", "--verbose"]) == 0
    assert seen[-1] == ["--batch", "1"] and not any(k in os.environ for k in QUIET_ENV)
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    assert cli.main(["bench", "engine", "--batch", "8"]) == 0
    assert seen[-1] == ["--batch", "8"]
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["PYTHONWARNINGS"] == "default"
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"


def test_vllm_import_warnings_follow_vllm_logging_level():
    """vLLM logs while being imported, before its handler exists (on CPU: "Triton is installed,
    but doesn't include CPU backend"); a process that imports the CLI first (every process of
    a ``vla-pruner`` command, spawned engine processes included) honours VLLM_LOGGING_LEVEL."""
    import os
    import subprocess
    import sys

    code = "import vllm_vla_pruner.cli, vllm.triton_utils"

    def stderr(level: str) -> str:
        env = {**os.environ, "VLLM_LOGGING_LEVEL": level}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr

    loud = stderr("WARNING")
    if "Triton is installed" not in loud:
        pytest.skip("this vLLM / Triton logs nothing while being imported")
    assert "Triton is installed" not in stderr("ERROR")


def test_serve_on_a_taken_port_says_so_before_starting(tiny_ckpt: Path) -> None:
    """``vla-pruner serve`` (the console command, in its own process) on a port another server
    listens on: one line naming ``--port``, exit 2, no engine started and no traceback."""
    import socket
    import subprocess

    from vllm_vla_pruner.research.ports import free_port

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        cmd = [sys.executable, "-m", "vllm_vla_pruner.cli", "serve", str(tiny_ckpt)]
        for host in ([], ["--host", "127.0.0.1"]):
            run = subprocess.run(
                [*cmd, "--port", str(port), *host], capture_output=True, text=True, timeout=120
            )
            out = run.stdout + run.stderr
            assert run.returncode == 2, out[-2000:]
            assert f"--port {port}: cannot listen on" in out and "in use" in out
            assert "Traceback" not in out and "starting vLLM" not in out


def test_listen_error_names_the_reason() -> None:
    import socket

    from vllm_vla_pruner.listen_check import listen_error
    from vllm_vla_pruner.research.ports import free_port

    port = free_port()
    assert listen_error("127.0.0.1", port) is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert "in use" in (listen_error("127.0.0.1", port) or "")
        assert "in use" in (listen_error(None, port) or "")  # all interfaces include it
    assert listen_error("127.0.0.1", port) is None  # closed (never connected): free again
    assert listen_error("127.0.0.1", 0) is None
