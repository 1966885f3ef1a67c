"""Two "nodes" over a real network: two network namespaces joined by a veth pair.

Each namespace has its own loopback and one end of the veth pair, with an address
of a private range used only inside these namespaces. Nothing reaches the host's
interfaces: gloo is bound to the veth (``GLOO_SOCKET_IFNAME``) and the rendezvous
is on node 0's veth address.

- ``torchrun --nnodes=2 --node_rank=i`` in each namespace: the logged losses must
  equal a one-node, two-process run of the same config.
- Slurm: ``slurmctld`` and one ``slurmd`` in namespace 0, a second ``slurmd`` in
  namespace 1 (two nodes of one cluster, each under its own name and address;
  ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts`` so the node names
  resolve), then ``sbatch -N 2 slurm/train.sbatch``.

Namespaces, the veth pair and the hosts files are removed, and every process
started is stopped by PID, in ``finally``. Without root or ``ip netns`` the tests
skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import slurm_cluster as sc
from tests.test_resilience import CONFIG, Ref, assert_same_losses, finish
from tests.test_train import REPO, Started, clean_env

pytestmark = pytest.mark.slow

#: Node i has address SUBNET.(i+1) on its veth end; private, used only inside.
SUBNET = "10.213.7"
#: The veth end's name inside each namespace.
IFNAME = "dinet0"


@dataclass
class Net:
    """Two namespaces, their veth interface names and addresses."""

    ns: tuple[str, str]
    ifname: tuple[str, str]
    addr: tuple[str, str]

    def exec(self, node: int) -> list[str]:
        """Command prefix that runs a program inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.ns[node]]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def two_namespaces(hosts: Mapping[str, str] | None = None) -> Iterator[Net]:
    """Create the namespaces and the veth pair; delete them (and the hosts files) at the end.

    Args:
        hosts: name -> address lines for ``/etc/netns/<ns>/hosts`` (node names).
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = f"{os.getpid() % 100000}"
    # The pair is made under unique names (they share the host's namespace for a
    # moment), then renamed to IFNAME inside each namespace: one GLOO_SOCKET_IFNAME.
    tmp_names = (f"di{tag}v0", f"di{tag}v1")
    net = Net(
        ns=(f"di{tag}n0", f"di{tag}n1"),
        ifname=(IFNAME, IFNAME),
        addr=(f"{SUBNET}.1", f"{SUBNET}.2"),
    )
    made: list[str] = []
    etc = [Path("/etc/netns") / n for n in net.ns]
    try:
        try:
            for n in net.ns:
                _ip("netns", "add", n)
                made.append(n)
        except RuntimeError as e:
            pytest.skip(f"cannot create network namespaces here: {e}")
        _ip("link", "add", tmp_names[0], "type", "veth", "peer", "name", tmp_names[1])
        for i in range(2):
            _ip("link", "set", tmp_names[i], "netns", net.ns[i])
            _ip("-n", net.ns[i], "link", "set", tmp_names[i], "name", net.ifname[i])
            _ip("-n", net.ns[i], "addr", "add", f"{net.addr[i]}/24", "dev", net.ifname[i])
            _ip("-n", net.ns[i], "link", "set", net.ifname[i], "up")
            _ip("-n", net.ns[i], "link", "set", "lo", "up")
        if hosts:
            text = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in hosts.items())
            for i, d in enumerate(etc):
                d.mkdir(parents=True, exist_ok=True)
                # The machine's own name too (torchrun resolves it): this node's address.
                (d / "hosts").write_text(text + f"{net.addr[i]} {socket.gethostname()}\n")
        yield net
    finally:
        for n in made:
            # Deleting a namespace also deletes the veth end inside it (and its peer).
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
        for d in etc:
            shutil.rmtree(d, ignore_errors=True)


def test_torchrun_two_nodes_over_veth_match_one_node(resilience_ref: Ref, tmp_path: Path) -> None:
    """torchrun --nnodes=2 --node_rank=i, one process per namespace, static rendezvous on
    node 0's veth address: the losses equal the one-node two-process run."""
    out, env = tmp_path / "run", clean_env(tmp_path)
    with two_namespaces() as net:
        nodes = []
        try:
            for i in range(2):
                cmd = [
                    *net.exec(i),
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    f"--node_rank={i}",
                    "--nproc_per_node=1",
                    f"--master_addr={net.addr[0]}",
                    "--master_port=29500",
                    "-m",
                    "dist_infonce.train",
                    *CONFIG,
                    "wandb.mode=disabled",
                    f"output_dir={out}",
                ]
                nodes.append(
                    Started(
                        cmd, {**env, "GLOO_SOCKET_IFNAME": net.ifname[i]}, tmp_path / f"node{i}.log"
                    )
                )
            for node in nodes:
                rc, output = finish(node)
                assert rc == 0, output[-4000:]
        finally:
            for node in nodes:
                if node.proc.poll() is None:
                    node.kill()
    assert_same_losses(
        out, resilience_ref.out, "two namespaces over veth (torchrun, static rendezvous)"
    )


# ------------------------------------------------------------------------- Slurm


class NetnsCluster(sc.SlurmCluster):
    """A :class:`~tests.slurm_cluster.SlurmCluster` whose clients run in namespace 0."""

    prefix: Sequence[str] = ()

    def run(self, args: Sequence[str], **kwargs):  # type: ignore[no-untyped-def, override]
        return super().run([*self.prefix, *args], **kwargs)


#: ``ip netns exec`` mounts a fresh /sys for the namespace, without /sys/fs/cgroup,
#: and slurmd 22.05 refuses to start unless /sys/fs/cgroup/systemd is a cgroup file
#: system, even with proctrack/linuxproc and task/none ("Unable to initialize cgroup
#: plugin"). A tmpfs and a new, empty named cgroup v1 hierarchy (not the host's)
#: satisfy that check; both mounts live only in that command's mount namespace.
CGROUP_SHIM = (
    "sh",
    "-c",
    "mount -t tmpfs cgroup_root /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd"
    " && mount -t cgroup -o none,name=dist_infonce_test cgroup /sys/fs/cgroup/systemd"
    ' && exec "$0" "$@"',
)


def _conf(root: Path, net: Net, ctld_port: int, slurmd_port: int) -> Path:
    lines = sc.conf_lines(
        root,
        cluster=f"di2n{ctld_port}",
        # slurmctld accepts "localhost" as its own name; slurmd reaches it at the address.
        ctld_host=f"localhost({net.addr[0]})",
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        nodes=[
            f"NodeName=n{i} NodeAddr={net.addr[i]} CPUs=1 RealMemory=2000 State=UNKNOWN"
            for i in range(2)
        ],
    )
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    (root / "plugstack.conf").write_text("")
    return conf


@contextlib.contextmanager
def two_node_cluster(net: Net) -> Iterator[NetnsCluster]:
    """munged (host), slurmctld + slurmd n0 (namespace 0), slurmd n1 (namespace 1)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="dist-infonce-2n-"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "spool/n0", "spool/n1", "log"):
        (root / sub).mkdir(mode=0o755)
    ctld_port, slurmd_port = sc._free_ports(2)
    conf = _conf(root, net, ctld_port, slurmd_port)
    cluster = NetnsCluster(root=root, conf=conf, cpus=1)
    cluster.prefix = net.exec(0)
    env = cluster.env()
    munge = root / "munge"
    try:
        subprocess.run(
            [sc._which("mungekey") or "mungekey", "-c", "-k", str(munge / "munge.key")],
            check=True,
            capture_output=True,
            timeout=30,
        )
        steps = [
            sc.munged_step(root),
            ([*net.exec(0), sc._which("slurmctld") or "slurmctld", "-i"], root / "slurmctld.pid"),
            (
                [*net.exec(0), *CGROUP_SHIM, sc._which("slurmd") or "slurmd", "-N", "n0"],
                root / "slurmd-n0.pid",
            ),
            (
                [*net.exec(1), *CGROUP_SHIM, sc._which("slurmd") or "slurmd", "-N", "n1"],
                root / "slurmd-n1.pid",
            ),
        ]
        for cmd, pid_file in steps:
            cluster.pid_files.append(pid_file)
            try:
                sc._start_daemon(cmd, env, pid_file)
            except RuntimeError as e:
                raise RuntimeError(f"{' '.join(cmd)}: {e}\n{cluster.log_tails()}") from None
        deadline = time.monotonic() + sc.READY_TIMEOUT_S
        states = ""
        while states != "idle idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle (sinfo: {states!r})\n{cluster.log_tails()}")
            time.sleep(sc.POLL_S)
            states = " ".join(
                sorted(cluster.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split())
            )
        yield cluster
    finally:
        sc._stop(cluster)
        shutil.rmtree(root, ignore_errors=True)


def test_sbatch_two_nodes_one_slurmd_per_namespace(resilience_ref: Ref, tmp_path: Path) -> None:
    """``sbatch -N 2 slurm/train.sbatch``: one torchrun per node (c10d on n0), gloo over the
    veth; both nodes take part and the losses equal the one-node run."""
    sc.skip_without_slurm()
    out, env = tmp_path / "run", clean_env(tmp_path)
    hosts = {"n0": f"{SUBNET}.1", "n1": f"{SUBNET}.2"}
    with two_namespaces(hosts) as net, two_node_cluster(net) as cluster:
        env.update(NPROC_PER_NODE="1", PYTHON=sys.executable)
        env["GLOO_SOCKET_IFNAME"] = IFNAME
        job = cluster.sbatch(
            "slurm/train.sbatch",
            [*CONFIG, "wandb.mode=disabled", f"output_dir={out}"],
            sbatch_args=["-N", "2", "--no-requeue"],
            env=env,
            cwd=REPO,
        )
        res = cluster.wait(job, timeout=180)
        print(f"sbatch -N 2 over two namespaces: {res.elapsed_s:.1f} s")
        assert (res.state, res.exit_code) == ("COMPLETED", 0), (
            res.output[-6000:] + cluster.log_tails()
        )
        assert "2 node(s) x 1 process(es), rendezvous n0:" in res.output
        fields = cluster._job_fields(job)
        assert fields.get("NodeList") == "n[0-1]", fields
    assert_same_losses(out, resilience_ref.out, "sbatch -N 2, one slurmd per namespace")
