"""Two nodes on one machine: network namespaces joined by a veth pair (10.77.0.1, 10.77.0.2),
one torchrun per node, c10d rendezvous over that link, one rank each. ZeRO-2 gives the same
per-step losses as 2 ranks on one node, and a checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from cluster_runs import PRETRAIN, REPO, TINY, cpu_env, latest_step, overrides, step_losses

pytestmark = pytest.mark.slow
ADDRS = ("10.77.0.1", "10.77.0.2")
PORT = 29731  # inside our own namespaces: nothing else listens there


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class TwoNodes:
    """Namespaces n0 / n1 with veth ends v0 / v1 and their own addresses; `remove` undoes it."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.names = (f"vms{tag}n0", f"vms{tag}n1")
        self.links = (f"vms{tag}v0", f"vms{tag}v1")

    def create(self) -> str | None:
        """None, or why namespaces cannot be made here."""
        if shutil.which("ip") is None:
            return "iproute2 (`ip`) is not installed"
        for ns in self.names:
            done = ip("netns", "add", ns)
            if done.returncode:
                return f"`ip netns add` refused: {done.stderr.strip()} (needs root / CAP_SYS_ADMIN)"
        steps = [("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])]
        for ns, link, addr in zip(self.names, self.links, ADDRS):
            steps += [("link", "set", link, "netns", ns),
                      ("-n", ns, "addr", "add", f"{addr}/24", "dev", link),
                      ("-n", ns, "link", "set", link, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = ip(*step)
            if done.returncode:
                return f"`ip {' '.join(step)}` refused: {done.stderr.strip()}"
        return None

    def remove(self) -> None:
        for ns in self.names:
            ip("netns", "delete", ns)  # takes its veth end, and so the pair, with it

    def node_command(self, node: int, out, *extra: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[node], sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRS[0]}:{PORT}", "--rdzv-id", "netns",
                "--rdzv-conf", f"is_host={int(node == 0)}",  # 10.77.0.1 is not this hostname's address
                "--local-addr", ADDRS[node], str(PRETRAIN), "--config", str(TINY), *overrides(out, *extra)]


@pytest.fixture
def two_nodes():
    nodes = TwoNodes()
    try:
        reason = nodes.create()
        if reason:
            pytest.skip(f"no network namespaces here: {reason}")
        yield nodes
    finally:
        nodes.remove()
    assert not set(nodes.names) & set(ip("netns", "list").stdout.split())


def test_two_namespace_nodes_match_two_ranks_on_one_node(two_nodes, tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [subprocess.Popen(two_nodes.node_command(node, multi),
                              cwd=REPO, env=cpu_env(GLOO_SOCKET_IFNAME=two_nodes.links[node]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "world_size      2" in logs[0] or "world_size 2" in logs[0].replace("  ", " ")

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(PRETRAIN), "--config", str(TINY),
                           *overrides(single)], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected, got = step_losses(single), step_losses(multi)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    assert latest_step(multi) == 6 and (multi / "final" / "model.safetensors").is_file()
    assert (multi / "checkpoints" / "step_00000003" / "complete.json").is_file()
    assert os.path.isfile(multi / "checkpoints" / "step_00000006" / "rank_state_1.safetensors")
