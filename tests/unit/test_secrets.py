"""Channel secrets: sealing, key rotation, secret rotation; the local stack's secret files."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from parley.localstack import redact_dsn, secret_file
from streams.channel_secrets import (
    Channel,
    Sealer,
    Secret,
    SecretsKeyError,
    from_json,
    rotate,
    split,
    to_json,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def _generic(*secrets: Secret) -> Channel:
    return Channel("support", "generic", NOW, {}, {"secret": secrets})


def test_sealed_secrets_open_with_any_key_and_reseal_under_the_first() -> None:
    old, new = Sealer.generate_key(), Sealer.generate_key()
    token = Sealer(old).seal({"secret": [{"value": "whsec_x", "expires_at": None}]})
    assert "whsec_x" not in token
    rotated = Sealer(f"{new},{old}")
    assert rotated.open(token) == {"secret": [{"value": "whsec_x", "expires_at": None}]}
    resealed = rotated.reseal(token)
    assert Sealer(new).open(resealed) == rotated.open(token)  # the old key can now be dropped
    with pytest.raises(SecretsKeyError):
        Sealer(old).open(resealed)


@pytest.mark.parametrize("keys", ["", " , ", "not-a-key", "a,b"])
def test_a_malformed_key_list_is_refused(keys: str) -> None:
    with pytest.raises(SecretsKeyError):
        Sealer(keys)


def test_split_keeps_lookup_fields_in_clear() -> None:
    public, secrets = split("whatsapp", {"phone_number_id": "123", "app_secret": "s1", "verify_token": "v1"})
    assert public == {"phone_number_id": "123"}
    assert secrets == {"app_secret": (Secret("s1"),), "verify_token": (Secret("v1"),)}
    assert from_json(to_json(secrets)) == secrets


def test_rotation_keeps_the_previous_secret_for_the_grace_period() -> None:
    ch = rotate(
        _generic(Secret("old")),
        {"secret": "new"},
        now=NOW,
        keep_previous_for=timedelta(hours=1),
        revoke_previous=False,
    )
    assert ch.config(NOW) == {"secret": "new", "secrets": ["new", "old"]}
    assert ch.config(NOW + timedelta(hours=1)) == {"secret": "new", "secrets": ["new"]}
    assert ch.summary(NOW)["secrets"]["secret"] == {
        "active": 2,
        "previous_expire_at": [(NOW + timedelta(hours=1)).isoformat()],
    }
    assert "old" not in str(ch.summary(NOW)) and "new" not in str(ch.summary(NOW)["secrets"])


def test_rotation_without_grace_or_with_revoke_leaves_only_the_new_secret() -> None:
    no_grace = rotate(
        _generic(Secret("old")),
        {"secret": "new"},
        now=NOW,
        keep_previous_for=timedelta(0),
        revoke_previous=False,
    )
    assert no_grace.config(NOW)["secrets"] == ["new"]
    kept = rotate(
        _generic(Secret("old")),
        {"secret": "new"},
        now=NOW,
        keep_previous_for=timedelta(days=1),
        revoke_previous=False,
    )
    revoked = rotate(kept, {}, now=NOW, keep_previous_for=timedelta(days=1), revoke_previous=True)
    assert revoked.config(NOW)["secrets"] == ["new"]


def test_rotating_back_to_a_previous_secret_promotes_it_and_the_list_is_bounded() -> None:
    ch = _generic(Secret("s0"))
    for i in range(1, 8):
        ch = rotate(
            ch, {"secret": f"s{i}"}, now=NOW, keep_previous_for=timedelta(days=1), revoke_previous=False
        )
    assert ch.config(NOW)["secrets"] == ["s7", "s6", "s5", "s4"]
    ch = rotate(ch, {"secret": "s5"}, now=NOW, keep_previous_for=timedelta(days=1), revoke_previous=False)
    assert ch.config(NOW)["secrets"] == ["s5", "s7", "s6", "s4"]
    assert ch.secrets["secret"][0].expires_at is None


def test_secret_files_are_0600_from_their_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Created with O_EXCL and mode 0600: never visible with wider permissions, even for a moment."""
    seen: list[int] = []
    real_chmod = os.chmod

    def spy(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", spy)
    old_umask = os.umask(0)  # the most permissive umask a caller could have
    try:
        token = secret_file(tmp_path / "admin-token", lambda: "t0ken")
    finally:
        os.umask(old_umask)
    assert token == "t0ken"
    assert stat.S_IMODE((tmp_path / "admin-token").stat().st_mode) == 0o600
    assert all(mode == 0o600 for mode in seen), f"the file existed with modes {[oct(m) for m in seen]}"
    assert secret_file(tmp_path / "admin-token", lambda: "other") == "t0ken"  # kept across runs


def test_a_secret_file_left_readable_by_an_earlier_version_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text("legacy")
    path.chmod(0o644)
    assert secret_file(path, lambda: "new") == "legacy"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            "postgresql://postgres:s3cr3t@127.0.0.1:5433/parley",
            "postgresql://postgres:***@127.0.0.1:5433/parley",
        ),
        ("postgresql://parley:p%40ss@db/parley", "postgresql://parley:***@db/parley"),
        ("postgresql://postgres@127.0.0.1/parley", "postgresql://postgres@127.0.0.1/parley"),
        ("postgresql://db/parley", "postgresql://db/parley"),
    ],
)
def test_dsn_passwords_are_masked(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
