"""The data directory's keys and lock: private, persistent, and never shared by two running peers."""

from __future__ import annotations

import os
import stat

import pytest

from p2ptrain.errors import ConfigError
from p2ptrain.swarm.identity import author_key, ensure_private_dir, lock_data_dir


def test_author_key_is_created_private_and_reused(tmp_path):
    data_dir = ensure_private_dir(tmp_path / "data")
    first = author_key(data_dir)
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data_dir / "author.key").st_mode) == 0o600
    assert author_key(data_dir).public_key() == first.public_key()


def test_a_damaged_author_key_is_a_clear_error(tmp_path):
    (tmp_path / "author.key").write_text("not a key")
    with pytest.raises(ConfigError, match="Move it away"):
        author_key(tmp_path)


def test_a_second_peer_on_the_same_data_dir_is_refused(tmp_path):
    with lock_data_dir(tmp_path):
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()}\) is using .*--data-dir"):
            lock_data_dir(tmp_path)
    with lock_data_dir(tmp_path):  # free again once the first peer is done
        pass
