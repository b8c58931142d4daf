"""The local runtime that `curvtrain pretrain` starts is reachable beyond loopback (Ray 2.60's agent listens
on the machine's address), so it is token-authenticated by default. Ray starts the agent of every local
runtime on the fixed port 52365: this file is named to run before any test starts the session's runtime,
and it says so when another runtime on the machine holds that port."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

AGENT_PORT = 52365  # ray._private.ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT; ray.init cannot change it


def agent_port_is_free(wait_s: float = 60.0) -> bool:
    """Whether the agent port can be bound, waiting for a runtime that is shutting down to let it go."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket() as s:
            try:
                s.bind(("", AGENT_PORT))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(1)


LOCAL_RUNTIME = """
import json, urllib.error, urllib.request, ray
from curvtrain.launcher.cluster import connect
connect(None, num_cpus_needed=1)
node = ray.nodes()[0]  # its dashboard agent's HTTP API (job submission included), at the machine's address
url = f"http://{node['NodeManagerAddress']}:{node['DashboardAgentListenPort']}/api/job_agent/jobs/none/logs"
try:
    status = urllib.request.urlopen(url, timeout=10).status
except urllib.error.HTTPError as e:
    status = e.code
answer = ray.get(ray.remote(lambda: 42).remote())
print(json.dumps({"answer": answer, "job_api": status, "still_local": connect(None, num_cpus_needed=1)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("auth, job_api", [({}, 401), ({"RAY_AUTH_MODE": "disabled"}, 404)])
def test_local_runtime_works_and_refuses_strangers(auth, job_api):
    """Ray's servers listen beyond loopback even for a local runtime (the agent on the machine's address):
    by default it answers an unauthenticated caller 401; with authentication disabled (what `connect` used
    to set) the job API is open (404: no such job, ask for another)."""
    assert agent_port_is_free(), f"another Ray runtime on this machine holds the agent port {AGENT_PORT}: run this test first"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | auth
    result = subprocess.run([sys.executable, "-c", LOCAL_RUNTIME], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"answer": 42, "job_api": job_api, "still_local": True}
