import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pprl import cluster


def test_ray_head_answers_with_its_token(ray_head):
    request = urllib.request.Request(f"{ray_head['dashboard']}/api/version", headers=cluster.auth_headers())
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 200


def test_ray_head_refuses_a_client_without_its_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head['dashboard']}/api/version", timeout=5)
    assert err.value.code == 401


def test_the_token_of_heads_pprl_starts_is_a_private_file(ray_head):
    token = Path(os.environ[cluster.TOKEN_PATH_ENV])
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o077 == 0
    assert len(token.read_text()) == 64
