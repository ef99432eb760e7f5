"""Peer settings: defaults < P2PTRAIN_* environment < flags, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2ptrain.errors import ConfigError
from p2ptrain.settings import resolve_settings


def test_precedence_defaults_env_flags(tmp_path):
    env = {
        "HOME": str(tmp_path),
        "P2PTRAIN_BATCH_SIZE": "4",
        "P2PTRAIN_PORT": "4000",
        "P2PTRAIN_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/QmA, /ip4/1.2.3.5/tcp/1/p2p/QmB",
    }
    settings = resolve_settings({"port": 5000, "device": None}, env)
    assert settings.data_dir == tmp_path / ".local/share/p2ptrain"  # default
    assert settings.batch_size == 4  # environment
    assert settings.port == 5000  # flag beats environment
    assert settings.device == "auto"  # a flag left unset does not override
    assert settings.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/QmA", "/ip4/1.2.3.5/tcp/1/p2p/QmB")


def test_p2p_daemon_and_mdns_from_env_and_flags():
    env = {"HOME": "/tmp", "P2PTRAIN_P2P": "py", "P2PTRAIN_MDNS": "off"}
    settings = resolve_settings({}, env)
    assert (settings.p2p, settings.mdns) == ("py", False)
    assert resolve_settings({"p2p": "go", "mdns": True}, env).p2p == "go"
    assert resolve_settings({}, {"HOME": "/tmp"}).p2p == "go"  # the default (README: why)


def test_xdg_data_home_is_respected():
    assert resolve_settings({}, {"XDG_DATA_HOME": "/srv/data"}).data_dir == Path("/srv/data/p2ptrain")


@pytest.mark.parametrize(
    "flags, env, message",
    [
        ({"batch_size": 0}, {}, "--batch-size"),
        ({"port": 70000}, {}, "--port"),
        ({"device": "tpu"}, {}, "--device"),
        ({"initial_peers": ["1.2.3.4:5"]}, {}, "not a multiaddr"),
        ({}, {"P2PTRAIN_PORT": "eighty"}, "P2PTRAIN_PORT='eighty'"),
        ({"p2p": "rust"}, {}, "--p2p must be go or py"),
        ({}, {"P2PTRAIN_MDNS": "maybe"}, "P2PTRAIN_MDNS='maybe'"),
    ],
)
def test_bad_values_name_the_setting(flags, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(flags, {"HOME": "/tmp", **env})


def test_settings_record_is_json_friendly(tmp_path):
    import json

    record = resolve_settings({"data_dir": tmp_path}, {}).to_record()
    assert json.loads(json.dumps(record))["data_dir"] == str(tmp_path)


def test_energy_settings_merge_file_then_environment_then_flags_and_hide_the_token(tmp_path):
    import json

    from p2ptrain.volunteer.config import build_config, describe, load_config, set_value

    config = build_config({"energy": {"country": "DEU", "intensity_source": "electricitymaps", "ledger_every_s": 30}})
    env = {"HOME": str(tmp_path), "P2PTRAIN_COUNTRY": "FR", "P2PTRAIN_ELECTRICITYMAPS_TOKEN": "s3cret"}
    energy = config.peer_settings({"meter": "none"}, env).energy
    assert (energy.country, energy.intensity_source, energy.ledger_every_s) == ("FR", "electricitymaps", 30.0)
    assert (energy.meter, energy.electricitymaps_token) == ("none", "s3cret")  # flag; environment
    assert config.peer_settings({"country": "GB"}, env).energy.country == "GB"  # the flag beats the environment
    record = json.dumps(config.peer_settings({}, env).to_record())  # logged and stored in checkpoints
    assert "s3cret" not in record and '"electricitymaps_token": "(set)"' in record
    set_value({}, "energy.electricitymaps_token", "s3cret", path=tmp_path / "config.toml")
    in_file = load_config({"P2PTRAIN_CONFIG": str(tmp_path / "config.toml")})
    assert ("energy.electricitymaps_token", "(set)", True) in describe(in_file)  # `p2ptrain config` hides it


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"country": "France"}, "not an ISO 3166 code"),
        ({"intensity_source": "wind"}, "intensity_source must be one of"),
        ({"meter": "wattmeter"}, "meter must be"),
    ],
)
def test_bad_energy_settings_name_the_setting(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(flags, {"HOME": "/tmp"})


def test_max_epochs_is_a_deprecated_name_of_max_steps_in_every_source(caplog):
    env = {"HOME": "/tmp"}
    assert resolve_settings({"max_epochs": 7}, env).max_steps == 7
    assert "--max-epochs is deprecated and will be removed: use --max-steps" in caplog.text
    assert resolve_settings({}, {**env, "P2PTRAIN_MAX_EPOCHS": "8"}).max_steps == 8
    assert "P2PTRAIN_MAX_EPOCHS is deprecated" in caplog.text
    assert resolve_settings({}, env, base={"max_epochs": 9}).max_steps == 9
    assert "config key 'max_epochs' is deprecated" in caplog.text
    assert resolve_settings({"max_epochs": 7, "max_steps": 3}, env).max_steps == 3  # the new name wins
