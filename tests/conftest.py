"""Shared fixtures: one local Ray per test session, shut down at the end."""
import os

import pytest

# Ray's token authentication stays on: a local init writes ~/.ray/auth_token, and the
# sweep scripts the tests start join the session's Ray (RAY_ADDRESS) with that token
# (see sweep_env).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Logical CPUs: 2 physical cores, oversubscribed so that training workers,
# teacher actors and Ray Data can all be scheduled (threads are set by hand).
RAY_TEST_CPUS = 8


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def raykd_cache(tmp_path_factory):
    """One corpus/task/teacher cache for the whole session (stages are cached by config hash)."""
    return tmp_path_factory.mktemp("raykd-cache")


def sweep_command(script, *args):
    import sys

    return [sys.executable, str(REPO / "sweeps" / script), *args]


def sweep_env(ray):
    """Environment for a sweep script: join the session's Ray instead of starting another."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # A process joining a cluster does not learn its auth mode: it must say "token" (and
    # finds the token in ~/.ray/auth_token), as a user joining a token cluster does.
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="session")
def smoke_study(ray_local, raykd_cache, tmp_path_factory):
    """The smoke study as a user runs it, interrupted and resumed.

    1. `tune_lr.py --preset smoke` for two strategies (so the grid has tuned and default LRs);
    2. `grid.py --preset smoke`, its driver SIGKILLed as soon as the first trial's row is written;
    3. `grid.py --preset smoke --resume`, which completes it.
    Returns the output folder and what was on disk at the moment of the kill.
    """
    import signal
    import subprocess
    import time

    out = tmp_path_factory.mktemp("smoke-study")
    env = sweep_env(ray_local)
    common = ["--preset", "smoke", "--out", str(out), "--cache-dir", str(raykd_cache)]
    tuned = subprocess.run(sweep_command("tune_lr.py", *common, "strategies=[scratch, tinybert]"), env=env,
                           capture_output=True, text=True, timeout=1500)
    assert tuned.returncode == 0, tuned.stderr[-3000:]

    log = open(out / "first-run.log", "w")
    driver = subprocess.Popen(sweep_command("grid.py", *common), env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 1500
    rows_dir = out / "trials"
    while time.time() < deadline and driver.poll() is None and not any(rows_dir.glob("*.json")):
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    at_kill = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in rows_dir.glob("*.json")}

    resumed = subprocess.run(sweep_command("grid.py", *common, "--resume"), env=env, capture_output=True,
                             text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"out": out, "at_kill": at_kill, "resume_stdout": resumed.stdout, "cache": raykd_cache, "env": env}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (tests/s3_server.py) with the bucket `raykd-test`; returns the
    AWS_* variables that point pyarrow, Ray and boto3 at it (fake credentials)."""
    import subprocess
    import sys
    import time

    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("s3") / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "s3_server.py"), str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    deadline = time.time() + 60
    while True:
        try:
            client.create_bucket(Bucket="raykd-test")
            break
        except Exception:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.3)
    yield env
    server.kill()
    server.wait()
    log.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server's variables in this test's environment; returns a fresh storage URI in the bucket."""
    import uuid

    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return f"s3://raykd-test/{uuid.uuid4().hex[:8]}"
