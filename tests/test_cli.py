"""The CLI in-process through `main(argv, env)`: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import hivemind
import msgpack
import pytest
from hivemind.utils import get_dht_time

from p2ptrain.cli.app import main
from p2ptrain.errors import ExitCode
from p2ptrain.swarm import discovery
from p2ptrain.swarm.invite import Invite
from p2ptrain.swarm.manifest import sign

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmSsYLSATJ1iNZWKdTPAeD8sFdXkidzkqyPwR7QeXuaxUw"


def run(capsys, tmp_path, *argv: str) -> tuple[int, str]:
    code = main(list(argv), env={"HOME": str(tmp_path)})
    return code, capsys.readouterr().err


def assert_nothing_half_written(data_dir):
    """Keys may exist (they are complete files); no run, checkpoint or swarm memory."""
    if data_dir.exists():
        assert not (data_dir / "runs").exists() and not (data_dir / "swarm.json").exists()
        assert not [p for p in data_dir.iterdir() if p.name.endswith(".tmp")]


def test_version_and_help(capsys, tmp_path):
    assert main(["version"], env={}) == 0
    assert "hivemind 1.1.12" in capsys.readouterr().out
    assert main(["join", "--help"], env={}) == 0
    shown = capsys.readouterr().out
    assert "--max-steps" in shown and "--max-epochs" not in shown  # the deprecated alias is hidden
    assert "(default: 31337)" in shown  # defaults are shown (rich once ate "[default: …]" as markup)
    assert main(["demo", "--help"], env={}) == 0
    shown = capsys.readouterr().out
    assert "--steps" in shown and "--epochs" not in shown


@pytest.mark.parametrize("command", [["seed"], ["join"]])
def test_every_peer_setting_declared_an_option_is_a_flag_of_the_peer_commands(capsys, command):
    from p2ptrain.cli.options import OPTION_FIELDS
    from p2ptrain.fields import flag_name

    assert main([*command, "--help"], env={"COLUMNS": "200"}) == 0
    shown = capsys.readouterr().out
    assert len(OPTION_FIELDS) >= 18
    assert not [flag_name(f) for f in OPTION_FIELDS.values() if flag_name(f) not in shown]


def test_a_peer_flag_reaches_the_settings(tmp_path, monkeypatch):
    from p2ptrain.cli import peer_commands

    seen = {}
    monkeypatch.setattr(peer_commands, "run_until_signalled", lambda settings, request: seen.update(s=settings))
    argv = ["join", "--model", "gpt2-tiny", "--threads", "3", "--no-mdns", "--initial-peers", "/ip4/1.2.3.4/tcp/1"]
    assert main([*argv, "--country", "FR", "--data-dir", str(tmp_path)], env={"HOME": str(tmp_path)}) == 0
    settings = seen["s"]
    assert (settings.torch_threads, settings.mdns, settings.initial_peers) == (3, False, ("/ip4/1.2.3.4/tcp/1",))
    assert (settings.energy.country, settings.data_dir, settings.port) == ("FR", tmp_path, 31337)


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["join", "--model", "gpt3"], ExitCode.USAGE, "unknown model 'gpt3' (--model). Known models: gpt2-tiny"),
        (["seed", "--model", "gpt3"], ExitCode.USAGE, "unknown model 'gpt3'"),
        (["join", "--model", "gpt2-tiny", "--invite", "p2pt1-garbage"], ExitCode.MANIFEST, "invite is truncated"),
        (["join", "--model", "gpt2-tiny", "--invite", "hello"], ExitCode.MANIFEST, "an invite starts with"),
        (["join", "--model", "gpt2-tiny", "--batch-size", "0"], ExitCode.USAGE, "--batch-size must be ≥ 1"),
        (["seed", "--model", "gpt2-tiny", "--dataset", "./missing.txt"], ExitCode.DATA, "does not exist (--dataset)"),
        (["seed", "--model", "gpt2-tiny", "--seq-len", "4096"], ExitCode.USAGE, "exceeds gpt2-tiny's context of 256"),
        (["seed", "--model", "gpt2-tiny", "--seq-len", "9000"], ExitCode.USAGE, "seq_len 9000 must be in [8, 8192]"),
        (["seed", "--model", "gpt2-tiny", "--lr", "3"], ExitCode.USAGE, "invalid swarm setting: lr 3.0"),
        (["seed", "--model", "gpt2-small", "--tokenizer", "no-such-tok"], ExitCode.DATA, "--tokenizer bytes"),
        (
            ["join", "--model", "gpt2-tiny", "--initial-peers", UNREACHABLE, "--host", "127.0.0.1", "--port", "0"],
            ExitCode.NETWORK,
            "none of the 1 initial peers answered",
        ),
        (["join", "--model", "gpt2-tiny", "--bogus"], ExitCode.USAGE, "No such option"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(capsys, tmp_path, argv, code, message):
    data_dir = tmp_path / "data"
    got, err = run(capsys, tmp_path, *argv, "--data-dir", str(data_dir))
    assert got == code, err
    assert message in err
    if "No such option" not in message:
        assert err.strip().splitlines()[-1].startswith("p2ptrain: error: ")
        assert "Traceback" not in err
    assert_nothing_half_written(data_dir)


def test_port_in_use(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(
            capsys,
            tmp_path,
            "seed",
            "--model",
            "gpt2-tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "d"),
        )
    assert code == ExitCode.NETWORK
    assert f"port {port} is in use by another program (--port={port})" in err


def join_tiny(capsys, tmp_path, invite: str, data_dir):
    """`p2ptrain join --model gpt2-tiny --invite …` on 127.0.0.1, in process."""
    args = ("--model", "gpt2-tiny", "--invite", invite, "--host", "127.0.0.1", "--port", "0")
    args += ("--data-dir", str(data_dir))
    return run(capsys, tmp_path, "join", *args)


def test_a_peer_serving_a_tampered_manifest_is_refused(capsys, tmp_path, manifest, key):
    """A real DHT node serves a manifest altered after signing under the invite's hash: join refuses it."""
    raw = msgpack.unpackb(sign(manifest, key))
    raw["manifest"] = raw["manifest"].replace(b"test-run", b"evil-run")
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        dht.store(discovery.manifest_key(manifest.hash), msgpack.packb(raw), get_dht_time() + 60)
        invite = Invite(manifest.hash, "gpt2-tiny", tuple(str(a) for a in dht.get_visible_maddrs())).encode()
        data_dir = tmp_path / "d"
        code, err = join_tiny(capsys, tmp_path, invite, data_dir)
    finally:
        dht.shutdown()
    assert code == ExitCode.MANIFEST
    assert "does not match the invite" in err
    assert_nothing_half_written(data_dir)


def test_invite_for_another_model_is_refused(capsys, tmp_path, manifest):
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        invite = Invite(manifest.hash, "gpt2-small", tuple(str(a) for a in dht.get_visible_maddrs())).encode()
        code, err = join_tiny(capsys, tmp_path, invite, tmp_path / "d")
    finally:
        dht.shutdown()
    assert code == ExitCode.USAGE
    assert "the invite is for model 'gpt2-small', not --model gpt2-tiny" in err


def test_the_process_exits_even_with_a_thread_stuck_in_an_executor(tmp_path):
    """After a shutdown around a training step stuck in hivemind, its threads still wait on executor calls into the
    stopped DHT; the interpreter's own exit would join them forever (seen: a SIGTERMed peer killed after 30 s)."""
    script = """if True:
        import concurrent.futures, logging, sys, threading
        import p2ptrain.cli.app as cli

        logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
        never = threading.Event()
        concurrent.futures.ThreadPoolExecutor(1).submit(never.wait)  # a call that never returns

        def main():
            logging.info("stopped, logged before the exit")
            return 3

        cli.main = main
        cli.run()
    """
    started = time.monotonic()
    argv = [sys.executable, "-c", script, str(tmp_path / "log")]
    done = subprocess.run(argv, timeout=60, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - started < 20  # the interpreter as it exits by itself: never (killed at 60 s)
    assert "stopped, logged before the exit" in (tmp_path / "log").read_text()
