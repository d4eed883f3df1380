"""The local Ray keeps token authentication on, and what joins it needs the token."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import sweep_env

JOIN = "import ray; ray.init(); print('joined', ray.cluster_resources().get('CPU'))"


def join(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=180)


def test_the_session_ray_admits_its_token_and_refuses_others(ray_local):
    assert (Path.home() / ".ray" / "auth_token").is_file()  # written by the local init: auth is on
    env = sweep_env(ray_local)  # RAY_ADDRESS and RAY_AUTH_MODE=token, as the tests' sweep scripts get
    own = join(env)
    assert own.returncode == 0 and "joined" in own.stdout, own.stderr[-2000:]
    for refused in ({**env, "RAY_AUTH_TOKEN": "0" * 32}, {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}):
        run = join(refused)  # a wrong token; no token at all (a client without auth)
        assert run.returncode != 0 and "joined" not in run.stdout
        assert "InvalidAuthToken" in run.stderr, run.stderr[-2000:]
