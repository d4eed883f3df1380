"""The local Ray keeps token authentication on, and what joins it needs the token."""
import os
import subprocess
import sys
from pathlib import Path

JOIN = "import ray; ray.init(); print('joined', ray.cluster_resources().get('CPU'))"


def join(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=180)


def test_the_session_ray_admits_its_token_and_refuses_another(ray_local):
    assert (Path.home() / ".ray" / "auth_token").is_file()  # written by the local init, auth on
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env.pop("RAY_AUTH_MODE", None)
    own = join(env)
    assert own.returncode == 0 and "joined" in own.stdout, own.stderr[-2000:]
    wrong = join({**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode != 0 and "joined" not in wrong.stdout
    assert "auth" in wrong.stderr.lower() or "token" in wrong.stderr.lower(), wrong.stderr[-2000:]
