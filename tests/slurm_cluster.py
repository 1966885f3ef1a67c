"""A real single-node Slurm cluster (slurmctld + slurmd + munge) for launch tests.

Everything lives under one temporary directory: the munge key and socket, the
Slurm state, spool, pid and log files, and ``slurm.conf``. The daemons listen on
free ports in the 16xxx range so they never meet a system Slurm on the default
6817/6818. Teardown cancels the jobs, then stops every daemon and what it started
by the PIDs recorded in the pid files (never by process name), also after a failed
test. Without the binaries, or without root (``SlurmdUser=root`` launches jobs
with setuid), the fixture skips with the reason.

Use it from a test module with
``from tests.slurm_cluster import slurm_cluster_fixture  # noqa: F401`` and a test
argument named ``slurm_cluster`` (the import registers the fixture; the different
name keeps ruff's F811 quiet), or call :func:`start_cluster` directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Binaries the fixture needs; the names are what Debian's packages install.
REQUIRED_BINARIES = (
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
)
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
#: Cold start is about one second here; the bound only guards against a hang.
READY_TIMEOUT_S = 30.0
POLL_S = 0.1
#: Time a daemon gets to exit on SIGTERM before it is sent SIGKILL.
STOP_TIMEOUT_S = 5.0


class SlurmJobTimeout(AssertionError):
    """A job did not leave the queue within the allowed time (it was cancelled)."""


@dataclass(frozen=True)
class JobResult:
    """How a batch job ended, as ``scontrol show job`` reports it.

    Attributes:
        job_id: The Slurm job id.
        state: ``COMPLETED``, ``FAILED``, ``CANCELLED``, ``TIMEOUT``, ...
        exit_code: The batch script's exit status (first half of ``ExitCode=a:b``).
        signal: The signal that ended the script, 0 if none.
        elapsed_s: Wall time from submission until the job left the queue.
        output: The job's stdout/stderr file (read after the job ended).
    """

    job_id: int
    state: str
    exit_code: int
    signal: int
    elapsed_s: float
    output: str


@dataclass
class SlurmCluster:
    """Handle on a running test cluster.

    Attributes:
        root: Temporary directory that holds every file of the cluster.
        conf: Path of the cluster's ``slurm.conf``.
        cpus: CPUs the single node ``localhost`` offers.
        startup_s: Seconds from the first daemon start until ``sinfo`` said idle.
        pid_files: Pid files of munged, slurmctld and slurmd, in start order.
    """

    root: Path
    conf: Path
    cpus: int
    startup_s: float = 0.0
    pid_files: list[Path] = field(default_factory=list)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return an environment for Slurm clients (and the jobs they submit).

        Inherited ``SLURM_*`` variables are dropped so that a test run inside a
        real Slurm allocation cannot leak its job into this cluster's jobs.

        Args:
            extra: Variables to set on top.

        Returns:
            A copy of ``os.environ`` with ``SLURM_CONF`` pointing at this cluster.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        if extra:
            env.update(extra)
        return env

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float = 30.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster.

        Args:
            args: The command, e.g. ``["squeue", "-h"]``.
            env: Extra environment variables.
            cwd: Working directory.
            timeout: Seconds before the command is killed.
            check: Raise ``CalledProcessError`` on a non-zero exit.

        Returns:
            The completed process with text stdout and stderr.
        """
        return subprocess.run(
            list(args),
            env=self.env(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sbatch(
        self,
        script: str | Path,
        script_args: Sequence[str] = (),
        *,
        sbatch_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """Submit a batch script and return its job id.

        The job's output goes to ``<root>/job-<id>.out`` unless ``sbatch_args``
        names another ``--output``.

        Args:
            script: Path of the batch script.
            script_args: Arguments passed to the script.
            sbatch_args: Options for ``sbatch`` itself (before the script).
            env: Extra environment variables (``sbatch`` exports the whole
                environment to the job).
            cwd: Submission directory (the job's working directory).

        Returns:
            The job id.
        """
        opts = list(sbatch_args)
        if not any(a.startswith(("-o", "--output")) for a in opts):
            opts.append(f"--output={self.root}/job-%j.out")
        proc = self.run(
            ["sbatch", "--parsable", *opts, str(script), *script_args], env=env, cwd=cwd
        )
        # --parsable prints "jobid" or "jobid;cluster".
        return int(proc.stdout.strip().split(";")[0])

    def wait(self, job_id: int, timeout: float) -> JobResult:
        """Wait until a job leaves the queue and return how it ended.

        ``sbatch --wait`` polls only every ~10 s; ``squeue`` every 0.1 s ends the
        wait within a tenth of a second of the job's end. A job still queued or
        running after ``timeout`` is cancelled and :class:`SlurmJobTimeout` raised,
        so a hung launch fails the test instead of hanging it.

        Args:
            job_id: The job to wait for.
            timeout: Seconds to wait.

        Returns:
            The job's end state, exit code and output.
        """
        start = time.monotonic()
        while True:
            q = self.run(["squeue", "-h", "-j", str(job_id)], check=False)
            # An empty listing is a finished job; "Invalid job id" one already purged.
            # Any other error (controller busy or gone) is retried until the deadline.
            if (q.returncode == 0 and not q.stdout.strip()) or "Invalid job id" in q.stderr:
                break
            if time.monotonic() - start > timeout:
                self.run(["scancel", str(job_id)], check=False)
                raise SlurmJobTimeout(
                    f"job {job_id} not finished after {timeout:.0f} s; cancelled. "
                    f"squeue: rc={q.returncode} {q.stdout.strip()} {q.stderr.strip()}\n"
                    f"{self.job_output(job_id)}\n{self.log_tails()}"
                )
            time.sleep(POLL_S)
        elapsed = time.monotonic() - start
        fields = self._job_fields(job_id)
        code, _, sig = fields.get("ExitCode", "-1:0").partition(":")
        return JobResult(
            job_id=job_id,
            state=fields.get("JobState", "UNKNOWN"),
            exit_code=int(code),
            signal=int(sig or 0),
            elapsed_s=elapsed,
            output=self.job_output(job_id, fields.get("StdOut")),
        )

    def job_output(self, job_id: int, path: str | None = None) -> str:
        """Return a job's output file, or a note when there is none."""
        out = Path(path) if path else self.root / f"job-{job_id}.out"
        return out.read_text(errors="replace") if out.is_file() else f"(no output file {out})"

    def _job_fields(self, job_id: int) -> dict[str, str]:
        """Parse ``scontrol show job -o`` into a dict (kept for MinJobAge=300 s)."""
        text = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        fields: dict[str, str] = {}
        for token in text.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def log_tails(self, lines: int = 20) -> str:
        """Return the end of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def missing_binaries() -> list[str]:
    """Return the required Slurm/munge binaries that are not on PATH (or sbin)."""
    return [b for b in REQUIRED_BINARIES if _which(b) is None]


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders a non-login PATH may lack."""
    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def _free_ports(count: int, low: int = 16000, high: int = 17000) -> list[int]:
    """Return ``count`` ports in [low, high) that can be bound on 127.0.0.1 right now.

    Starting from a random offset keeps two concurrent test sessions apart.
    """
    ports: list[int] = []
    start = low + int.from_bytes(os.urandom(2), "little") % (high - low)
    for i in range(high - low):
        port = low + (start - low + i) % (high - low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports in [{low}, {high})")


def munged_step(root: Path) -> tuple[list[str], Path]:
    """The munged command of a test cluster rooted at ``root`` (key, socket, pid, log
    and seed under ``root/munge`` and ``root/log``) and its pid file."""
    munge = root / "munge"
    cmd = [
        _which("munged") or "munged",
        f"--key-file={munge / 'munge.key'}",
        f"--socket={munge / 'munge.sock'}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--log-file={root / 'log' / 'munged.log'}",
        f"--seed-file={munge / 'munged.seed'}",
    ]
    return cmd, munge / "munged.pid"


def conf_lines(
    root: Path,
    *,
    cluster: str,
    ctld_host: str,
    ctld_port: int,
    slurmd_port: int,
    nodes: Sequence[str],
) -> list[str]:
    """slurm.conf for a test cluster rooted at ``root``: every state, spool, pid and log
    path under it (per node name, ``%n``, so that several slurmd can share it), no
    cgroups, munge through ``root/munge``; ``nodes`` are its ``NodeName=`` lines, all in
    one partition."""
    munge_socket = root / "munge" / "munge.sock"
    names = ",".join(line.split()[0].removeprefix("NodeName=") for line in nodes)
    return [
        f"ClusterName={cluster}",
        f"SlurmctldHost={ctld_host}",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire=10 (and the 1 s scheduler passes below): a requeued job starts
        # again after ~11 s instead of Slurm's default ~2 minutes.
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        "JobRequeue=1",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        # No cgroups in a container: track job processes by parent PID, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        # Keep finished jobs visible to `scontrol show job` for the tests.
        "MinJobAge=300",
        # No user plugin stack of the host may load into this cluster.
        f"PlugStackConfig={root / 'plugstack.conf'}",
        *nodes,
        f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
    ]


def _write_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int) -> Path:
    """Write the cluster's slurm.conf and return its path."""
    lines = conf_lines(
        root,
        cluster=f"distinfonce{ctld_port}",
        # slurmctld accepts "localhost" as its own name whatever the hostname is.
        ctld_host="localhost",
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        nodes=[f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN"],
    )
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    (root / "plugstack.conf").write_text("")
    return conf


def _read_pid(pid_file: Path) -> int | None:
    """Return the PID in a pid file, or None when it is missing or empty."""
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    """Return whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pids: Sequence[int]) -> list[int]:
    """Return every process below ``pids`` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cluster_processes(conf: Path, daemons: Sequence[int] = ()) -> list[int]:
    """Return the PIDs of everything this cluster started, daemons excluded.

    slurmd double-forks ``slurmstepd``, which is then a child of init, not of
    slurmd; so job processes are found by the marker only this cluster sets: the
    environment variable ``SLURM_CONF=<this cluster's slurm.conf>`` (a unique
    temporary path), which slurmstepd and the jobs inherit. Their descendants and
    the daemons' own (slurmscriptd) are added. This process is never listed.
    """
    marker = f"SLURM_CONF={conf}".encode()
    marked: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            marked.append(int(entry.name))
    found = set(marked) | set(_descendants([*marked, *daemons]))
    return sorted(found - set(daemons) - {os.getpid()})


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until all ``pids`` have exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each PID, ignoring those that are already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop(cluster: SlurmCluster) -> None:
    """Cancel all jobs, then stop the daemons and their children by PID."""
    if cluster.conf.exists():
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            jobs = cluster.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10).stdout
            if jobs.split():
                cluster.run(["scancel", *jobs.split()], check=False, timeout=10)
                deadline = time.monotonic() + 10
                while (
                    time.monotonic() < deadline
                    and cluster.run(["squeue", "-h"], check=False, timeout=10).stdout.strip()
                ):
                    time.sleep(POLL_S)
    daemons = [p for p in (_read_pid(f) for f in cluster.pid_files) if p is not None]
    # Collected before the daemons go: slurmstepd, job processes, slurmscriptd.
    below = cluster_processes(cluster.conf, daemons)
    # Reverse start order: slurmd, then slurmctld, then munged, which both need.
    _signal(list(reversed(daemons)), signal.SIGTERM)
    _signal(_wait_gone(daemons, STOP_TIMEOUT_S), signal.SIGKILL)
    _signal(_wait_gone(below, 1.0), signal.SIGKILL)
    _wait_gone(daemons + below, STOP_TIMEOUT_S)


def _start_daemon(cmd: Sequence[str], env: Mapping[str, str], pid_file: Path) -> None:
    """Start a self-daemonising program and wait until it wrote its pid file."""
    proc = subprocess.run(
        list(cmd), env=dict(env), capture_output=True, text=True, timeout=READY_TIMEOUT_S
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while _read_pid(pid_file) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} wrote no pid file {pid_file}")
        time.sleep(0.02)


@contextlib.contextmanager
def start_cluster(cpus: int = 2) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under a temp dir; stop them on exit.

    Args:
        cpus: CPUs the node ``localhost`` declares (jobs may ask for up to this).

    Yields:
        The running cluster; ``sinfo`` reports the node idle.

    Raises:
        RuntimeError: A daemon failed to start or the node never became idle
            (the message carries the daemon logs).
    """
    # A short path: the munge socket name must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="dist-infonce-slurm-"))
    # munged refuses a socket folder that others may write to or cannot enter.
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "spool/localhost", "log"):
        (root / sub).mkdir(mode=0o755)
    ctld_port, slurmd_port = _free_ports(2)
    conf = _write_conf(root, cpus, ctld_port, slurmd_port)
    cluster = SlurmCluster(root=root, conf=conf, cpus=cpus)
    env = cluster.env()
    munge = root / "munge"
    try:
        start = time.monotonic()
        subprocess.run(
            [_which("mungekey") or "mungekey", "-c", "-k", str(munge / "munge.key")],
            check=True,
            capture_output=True,
            timeout=30,
        )
        steps = [
            munged_step(root),
            # -i: ignore (there is no) saved state.
            ([_which("slurmctld") or "slurmctld", "-i"], root / "slurmctld.pid"),
            # -N: the node is "localhost" in slurm.conf, not the machine's hostname.
            ([_which("slurmd") or "slurmd", "-N", "localhost"], root / "slurmd-localhost.pid"),
        ]
        for cmd, pid_file in steps:
            # Recorded before the start so a half-started cluster is still stopped.
            cluster.pid_files.append(pid_file)
            _start_daemon(cmd, env, pid_file)
        deadline = time.monotonic() + READY_TIMEOUT_S
        state = ""
        while state != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not idle after {READY_TIMEOUT_S:.0f} s (state {state!r})")
            time.sleep(POLL_S)
            state = cluster.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
        cluster.startup_s = time.monotonic() - start
    except BaseException as exc:
        logs = cluster.log_tails()
        _stop(cluster)
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, RuntimeError):
            raise RuntimeError(f"Slurm test cluster did not start: {exc}\n{logs}") from exc
        raise
    try:
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(root, ignore_errors=True)


def skip_without_slurm() -> None:
    """Skip the calling test when the binaries are missing or we are not root."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge binaries not found: {', '.join(missing)} ({INSTALL_HINT})")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (SlurmdUser=root); not root")


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A running single-node Slurm 22.05 cluster (skips without the binaries or root).

    Session-scoped: the cold start (about a second) is paid once, and the jobs of
    different tests run one after another on the node's CPUs.
    """
    skip_without_slurm()
    with start_cluster() as cluster:
        print(f"Slurm test cluster up in {cluster.startup_s:.2f} s ({cluster.root})")
        yield cluster
