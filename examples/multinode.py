"""Two nodes, one object store, a node killed mid-save, a resume on another world size.

zckpt across machines that share nothing but an S3 store, on one Linux host: three network
namespaces stand in for the machines (root and ``ip`` from iproute2 needed)::

    store   10.77.0.1   moto's S3 server (server mode), the only thing the nodes share
    node0   10.77.0.10  torchrun --nnodes 2 --nproc-per-node 2 (hosts the c10d rendezvous)
    node1   10.77.0.11  torchrun --nnodes 2 --nproc-per-node 2

joined by a bridge inside ``store`` (a veth pair per node, both ends created inside the
namespaces): nothing is added to the host's own network, and every packet stays inside these
namespaces. Each node runs in a private scratch directory of its own (working directory,
``TMPDIR``, torchrun's files) and reaches the checkpoints only at ``s3://zckpt-multinode/...``.
The training script is ``examples/multinode_train.py`` (ZeroAdamW, Checkpointer, saves every
``--save-every`` steps); its losses do not depend on the world size, bit for bit.

1. **crash**: 4 ranks on the 2 nodes train and save. From the first commit on, node1 runs only
   in slices of a few milliseconds (every process of it frozen with SIGSTOP, found in /proc
   as ``ip netns pids`` does, the store looked at by a watcher in the store's namespace, then
   thawed); node0 runs freely. Once a save is caught in flight (a rank's blob uploaded, not all
   of them, no manifest) and half a second later still cannot have committed, node1 is
   SIGKILLed: a machine gone in the middle of a save. (A save that gets through first is let
   go, and the next one stepped in thinner slices.) node0's ranks then fail, or are killed
   after ``--grace`` seconds. The store must show the killed tag uncommitted, ``latest``
   naming the save before it, and every committed tag verified (``zckpt.verify_checkpoint``).
2. **resume**: 3 ranks on node0 alone resume from ``latest`` in the store (each reads only the
   byte ranges of its new partitions) and train to the end; meanwhile an uninterrupted
   **reference** run trains the same steps (one rank on node0, or 2 nodes x 2 ranks before the
   crash with ``--reference-nodes 2``).

Every loss of the crash and resumed runs, and the final parameters, must equal the reference's
bit for bit. Exit status 0 when every check passed::

    sudo .venv/bin/python examples/multinode.py             # or: sudo scripts/multinode
    .venv/bin/python examples/multinode.py --steps 8 --hidden 64 --json report.json

The namespaces, the server and every process started are removed at exit, also on failure,
Ctrl-C or SIGTERM (a SIGKILL of this script leaves namespaces named ``zckpt-<pid>-...``: remove
them with ``ip netns del``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUCKET = "zckpt-multinode"
KEY = SECRET = "multinode"  # moto accepts any credentials
SUBNET = "10.77.0"
STORE_IP, NODE_IPS = f"{SUBNET}.1", (f"{SUBNET}.10", f"{SUBNET}.11")
S3_PORT = 9000
HERE = Path(__file__).resolve()
TRAIN = HERE.parent / "multinode_train.py"
REPO = HERE.parent.parent
MANIFEST = "manifest.zckm"


# ---------------------------------------------------------------------------------------------
# Store-side helpers: run inside the store's namespace (only it and the nodes reach the server)
# ---------------------------------------------------------------------------------------------


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )


def store_ready(argv: Sequence[str]) -> int:
    """Wait for the server, then create the bucket."""
    client = _client(argv[0])
    deadline = time.monotonic() + 120
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return 0
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _listing(client: Any, prefix: str) -> tuple[set[str], dict[str, set[str]]]:
    """Object names right under ``prefix/`` (``latest``, locks), and per tag directory."""
    root: set[str] = set()
    names: dict[str, set[str]] = {}
    token: dict[str, str] = {}
    while True:
        r = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/", **token)
        for o in r.get("Contents", []):
            tag, _, name = o["Key"][len(prefix) + 1 :].partition("/")
            if name:
                names.setdefault(tag, set()).add(name)
            else:
                root.add(tag)
        if not r.get("IsTruncated"):
            return root, names
        token = {"ContinuationToken": r["NextContinuationToken"]}


def _rank_blobs(names: set[str]) -> tuple[list[str], int]:
    """The rank blobs among ``names``, and the world size they were written at (0: none)."""
    blobs = sorted(n for n in names if re.search(r"\.rank\d+-of-\d+\.zck$", n))
    ws = int(blobs[0].rsplit("-of-", 1)[1].split(".")[0]) if blobs else 0
    return blobs, ws


def store_watch(argv: Sequence[str]) -> int:
    """Answer the orchestrator's questions about the store, on stdin/stdout.

    Each ``check TAG`` line read is answered with ``state TAG {"blobs": [...], "world_size": N,
    "committed": bool, "latest": bool}`` (one listing of the prefix); ``done``
    or the end of stdin ends it. Run in the store's namespace, so a look costs one request on
    the bridge and no process start."""
    endpoint, prefix = argv
    client = _client(endpoint)
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["check"] or len(words) != 2:
            return 0
        tag = words[1]
        root, names = _listing(client, prefix)
        mine = names.get(tag, set())
        blobs, ws = _rank_blobs(mine)
        state = {
            "blobs": blobs,
            "world_size": ws,
            "committed": MANIFEST in mine,
            "latest": "latest" in root,
        }
        print("state", tag, json.dumps(state), flush=True)
    return 0


def store_inspect(argv: Sequence[str]) -> int:
    """What the store holds under a run's prefix, as JSON: committed tags, ``latest``, the
    objects of tags without a manifest, unfinished multipart uploads, and ``verify_checkpoint``
    of the save_dir (every committed tag and ``latest``)."""
    import s3fs

    import zckpt
    from zckpt.store import FsspecStorage

    endpoint, prefix = argv
    client = _client(endpoint)
    root, names = _listing(client, prefix)
    uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "/").get("Uploads", [])
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
    storage = FsspecStorage(fs)
    url = f"s3://{BUCKET}/{prefix}"
    latest = None
    if "latest" in root:
        latest = client.get_object(Bucket=BUCKET, Key=f"{prefix}/latest")["Body"].read()
    out = {
        "tags": [t.tag for t in zckpt.list_tags(url, storage=storage)],
        "latest": latest.decode().strip() if latest else None,
        "uncommitted": {t: sorted(n) for t, n in names.items() if MANIFEST not in n},
        "uploads": sorted(u["Key"][len(prefix) + 1 :] for u in uploads),
        "locks": sorted(n for n in root if n.endswith(".zckpt-lock")),
        "verified": {r.tag: bool(r.ok) for r in zckpt.verify_checkpoint(url, storage=storage)},
    }
    print(json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The cluster: namespaces, processes, and their removal
# ---------------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Cluster:
    """Three network namespaces (a store and two nodes), their processes, and their removal."""

    def __init__(self, root: Path) -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.root = root
        self.store, self.nodes = f"zckpt-{tag}-s", (f"zckpt-{tag}-n0", f"zckpt-{tag}-n1")
        self.dirs = {self.store: "store", self.nodes[0]: "node0", self.nodes[1]: "node1"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created: list[str] = []
        self.endpoint = f"http://{STORE_IP}:{S3_PORT}"

    def up(self) -> None:
        for ns in (self.store, *self.nodes):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            (self.root / self.dirs[ns]).mkdir(parents=True, exist_ok=True)
        s = self.store
        _ip("-n", s, "link", "add", "br0", "type", "bridge")
        _ip("-n", s, "addr", "add", f"{STORE_IP}/24", "dev", "br0")
        _ip("-n", s, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.nodes, NODE_IPS)):
            peer = ("peer", "name", f"v{i}", "netns", s)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", *peer)
            _ip("-n", s, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", s, "link", "set", f"v{i}", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def scratch(self, ns: str) -> Path:
        return self.root / self.dirs[ns]

    def _env(self, ns: str) -> dict[str, str]:
        env = dict(os.environ, TMPDIR=str(self.scratch(ns)), OMP_NUM_THREADS="1")
        env.update(GLOO_SOCKET_IFNAME="eth0", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(proxy, None)
        return env

    def spawn(self, ns: str, cmd: list[str], log: str | None) -> subprocess.Popen[bytes]:
        """``cmd`` inside namespace ``ns``, in its scratch directory, its output to ``log``
        there (None: stdin and stdout are pipes)."""
        where = self.scratch(ns)
        pipe = subprocess.PIPE
        out: Any = pipe if log is None else open(where / log, "ab")  # noqa: SIM115
        try:
            p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd],
                cwd=where,
                env=self._env(ns),
                stdin=pipe if log is None else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log else None,
                start_new_session=True,
            )
        finally:
            if log is not None:
                out.close()
        self.procs.append(p)
        return p

    def helper(self, *args: str, timeout: float = 180) -> str:
        """One of this file's ``store-*`` commands, in the store's namespace; its stdout."""
        r = subprocess.run(
            ["ip", "netns", "exec", self.store, sys.executable, str(HERE), *args],
            cwd=self.scratch(self.store),
            env=self._env(self.store),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r.stdout

    def pids(self, ns: str) -> list[int]:
        """The processes in namespace ``ns`` (what ``ip netns pids`` prints, read from /proc
        directly: the orchestrator asks this every few milliseconds while it steps a node)."""
        try:
            want = os.stat(f"/run/netns/{ns}").st_ino
        except FileNotFoundError:
            return []
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == want:
                    found.append(int(entry.name))
        return found

    def signal(self, ns: str, sig: int, pids: Sequence[int] | None = None) -> list[int]:
        """Send ``sig`` to every process in namespace ``ns`` (or to ``pids``)."""
        pids = self.pids(ns) if pids is None else list(pids)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        return pids

    def kill(self, ns: str) -> list[int]:
        """SIGKILL every process in namespace ``ns`` (a machine losing power), until none is
        left (one forked meanwhile is caught by the next pass)."""
        killed: list[int] = []
        for _ in range(100):
            pids = self.signal(ns, signal.SIGKILL)
            if not pids:
                break
            killed += [p for p in pids if p not in killed]
            time.sleep(0.05)
        return killed

    def down(self) -> None:
        for ns in reversed(self.created):
            self.kill(ns)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()

    def torchrun(
        self, ns: str, nnodes: int, nproc: int, port: int, train: list[str], log: str
    ) -> subprocess.Popen[bytes]:
        """torchrun of the training script on node ``ns``: c10d rendezvous at node0's address
        (node0 hosts it), this node's own address for its workers."""
        ip = NODE_IPS[self.nodes.index(ns)]
        host = "1" if ns == self.nodes[0] else "0"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={NODE_IPS[0]}:{port}",
            f"--rdzv-id={log}",
            f"--rdzv-conf=is_host={host},join_timeout=180",
            f"--local-addr={ip}",
            str(TRAIN),
            "--endpoint",
            self.endpoint,
            "--key",
            KEY,
            "--secret",
            SECRET,
            *train,
        ]
        return self.spawn(ns, cmd, log)


# ---------------------------------------------------------------------------------------------
# The runs and the checks
# ---------------------------------------------------------------------------------------------

_LOSS = re.compile(r"multinode: step (\d+) loss (\S+)")
_PARAMS = re.compile(r"multinode: params (\S+) (\S+)")
_RESUMED = re.compile(r"multinode: resumed (\S+) at step (\d+)")


def _parse(logs: Sequence[Path]) -> tuple[dict[int, str], tuple[str, str] | None]:
    losses: dict[int, str] = {}
    params = None
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        for m in _LOSS.finditer(text):
            losses[int(m.group(1))] = m.group(2)
        for m in _PARAMS.finditer(text):
            params = (m.group(1), m.group(2))
    return losses, params


def _wait(procs: Sequence[subprocess.Popen[bytes]], timeout: float, what: str) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what}: still running after {timeout:.0f} s") from None
    return codes


def _tail(path: Path, n: int = 30) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return f"--- {path}\n" + "\n".join(lines[-n:])


_T0 = time.monotonic()


def _log(*words: object) -> None:
    print(f"[multinode {time.monotonic() - _T0:6.1f} s]", *words, flush=True)


def _catch_and_kill(
    c: Cluster,
    watch: subprocess.Popen[bytes],
    nodes: Sequence[subprocess.Popen[bytes]],
    tags: Sequence[str],
) -> tuple[str, dict[str, Any]]:
    """Step node1 through the run until a save of one of ``tags`` is caught with some rank
    blobs stored but not all of them; then, if after half a second frozen the save has still
    not committed (it cannot, without node1's ranks), SIGKILL node1.

    From the first commit on (``latest`` in the store: a save to fall back to), node1 only runs
    in slices: frozen, the store looked at, thawed for ``thaw`` seconds, frozen again. node0
    runs freely, so when a save starts its ranks' blobs arrive while node1's wait for a thaw.
    Starting at the save's own lock is too late: under load one listing of the store outlasts
    a small save (CI saw every blob already stored at the first look). A save that commits while
    stepped halves the slice for the next."""
    assert watch.stdout is not None and watch.stdin is not None
    out, into = watch.stdout, watch.stdin
    seen: list[str] = []

    def ask(tag: str) -> dict[str, Any]:
        into.write(f"check {tag}\n".encode())
        into.flush()
        answer = out.readline().decode()
        if not answer.startswith("state "):
            raise RuntimeError(f"the watcher answered {answer!r}")
        state: dict[str, Any] = json.loads(answer.split(" ", 2)[2])
        return state

    def caught(state: dict[str, Any]) -> bool:
        return not state["committed"] and 0 < len(state["blobs"]) < state["world_size"]

    thaw, stepping, cycles = 0.02, False, 0
    try:
        for tag in tags:
            while all(p.poll() is None for p in nodes):
                frozen = c.signal(c.nodes[1], signal.SIGSTOP) if stepping else []
                state = ask(tag)
                if stepping and caught(state):
                    time.sleep(0.5)  # a commit that did not need node1 would show by now
                    state = ask(tag)
                    if caught(state):
                        killed = c.kill(c.nodes[1])
                        info = dict(state, frozen=len(frozen), killed=len(killed), cycles=cycles)
                        return tag, info
                if stepping:
                    c.signal(c.nodes[1], signal.SIGCONT, frozen)
                    cycles += 1
                if state["committed"]:
                    how = f" (slices of {thaw * 1e3:g} ms)" if stepping else ""
                    seen.append(f"{tag} committed{how}")
                    thaw = max(thaw / 2, 0.001) if stepping else thaw
                    break
                if not stepping and state["latest"]:
                    stepping = True
                    seen.append(f"stepping node1 from before {tag}")
                time.sleep(thaw if stepping else 0.005)
    finally:
        c.signal(c.nodes[1], signal.SIGCONT)  # never leave node1 frozen on the way out
        with contextlib.suppress(OSError):
            into.write(b"done\n")
            into.flush()
    raise RuntimeError(
        f"no save was caught in flight (watcher: {seen}, {cycles} slices); node exits "
        f"{[p.poll() for p in nodes]}"
    )


def orchestrate(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """The runs and the checks, filling ``report`` (RuntimeError on a failed check)."""
    root = Path(tempfile.mkdtemp(prefix="zckpt-multinode-"))
    c = Cluster(root)
    report.update(scratch=str(root), ok=False)
    report["namespaces"] = [c.store, *c.nodes]
    train = [
        f"--steps={args.steps}",
        f"--save-every={args.save_every}",
        f"--hidden={args.hidden}",
        f"--lease={args.lease}",
    ]
    n0, n1 = c.nodes
    started = time.monotonic()
    try:
        c.up()
        _log(
            f"namespaces {c.store} (S3 at {c.endpoint}), {n0} ({NODE_IPS[0]}), {n1} "
            f"({NODE_IPS[1]}); scratch directories under {root}"
        )
        moto = [sys.executable, "-m", "moto.server", "-H", STORE_IP, "-p", str(S3_PORT)]
        c.spawn(c.store, moto, "moto.log")
        c.helper("store-ready", c.endpoint)

        def url(prefix: str) -> list[str]:
            return [f"--url=s3://{BUCKET}/{prefix}"]

        ref_logs = [c.scratch(n0) / "reference.log"]
        reference: list[subprocess.Popen[bytes]] = []
        if args.reference_nodes == 2:
            ref_logs.append(c.scratch(n1) / "reference.log")
            reference = [
                c.torchrun(ns, 2, 2, 29400, [*url("reference"), *train], "reference.log")
                for ns in c.nodes
            ]
            _wait(reference, args.timeout, "reference run")

        # 1. 2 nodes x 2 ranks; node1 killed while a save is in flight.
        t = time.monotonic()
        saves = list(range(args.save_every, args.steps, args.save_every))
        tags = [f"global_step{s}" for s in saves[1:]]  # a committed save to fall back to
        watch = c.spawn(
            c.store, [sys.executable, str(HERE), "store-watch", c.endpoint, "crash"], None
        )
        nodes = [
            c.torchrun(ns, 2, 2, 29401, [*url("crash"), *train], "crash.log") for ns in c.nodes
        ]
        tag, caught = _catch_and_kill(c, watch, nodes, tags)
        _log(
            f"crash: {tag} in flight, {len(caught['blobs'])} of {caught['world_size']} rank "
            f"blobs stored (after {caught['cycles']} freeze/thaw slices of node1): SIGKILLed "
            f"node1's {caught['killed']} processes"
        )
        try:
            node0 = _wait(nodes[:1], args.grace, "node0")[0]
            how = f"exited {node0}"
        except RuntimeError:
            c.kill(n0)
            node0 = nodes[0].wait()
            how = f"was still running after {args.grace:g} s: killed"
        crash_logs = [c.scratch(ns) / "crash.log" for ns in c.nodes]
        crash_losses, _ = _parse(crash_logs)
        state = json.loads(c.helper("store-inspect", c.endpoint, "crash"))
        step = int(tag.removeprefix("global_step"))
        before = f"global_step{step - args.save_every}"
        report["crash"] = {
            "seconds": round(time.monotonic() - t, 1),
            "killed_during": tag,
            "caught": caught,
            "node0": how,
            "store": state,
            "losses": crash_losses,
        }
        _log(
            f"crash: node0 {how}; the store: tags {state['tags']}, latest {state['latest']}, "
            f"uncommitted {state['uncommitted']}, unfinished uploads {state['uploads']}, "
            f"locks {state['locks']}, verify {state['verified']}"
        )
        problems = []
        if tag in state["tags"]:
            problems.append(f"the save of {tag} committed although node1 died inside it")
        if state["latest"] != before or before not in state["tags"]:
            problems.append(f"latest is {state['latest']!r}, not {before}")
        if not state["verified"] or not all(state["verified"].values()):
            problems.append(f"verify_checkpoint found problems: {state['verified']}")

        # 2. Resume on 3 ranks, node0 alone; the reference meanwhile (if not run before).
        t = time.monotonic()
        resume = c.torchrun(n0, 1, 3, 29402, [*url("crash"), *train, "--resume"], "resume.log")
        if not reference:
            reference = [c.torchrun(n0, 1, 1, 29403, [*url("reference"), *train], "reference.log")]
        codes = _wait([resume, *reference], args.timeout, "resume and reference runs")
        rlog = c.scratch(n0) / "resume.log"
        if any(codes):
            raise RuntimeError(
                f"resume/reference exited {codes}:\n{_tail(rlog)}\n"
                + "\n".join(_tail(p) for p in ref_logs)
            )
        ref, ref_params = _parse(ref_logs)
        got, got_params = _parse([rlog])
        resumed = _RESUMED.search(rlog.read_text())
        start = int(resumed.group(2)) if resumed else -1
        report["reference"] = {
            "ranks": "2 nodes x 2" if args.reference_nodes == 2 else "1",
            "losses": ref,
        }
        report["resume"] = {"seconds": round(time.monotonic() - t, 1), "from": start, "losses": got}
        _log(
            f"resume: 3 ranks on node0 from step {start}, steps {min(got, default=None)}.."
            f"{max(got, default=None)}"
        )
        if sorted(ref) != list(range(1, args.steps + 1)) or ref_params is None:
            problems.append(f"the reference run logged losses for steps {sorted(ref)}")
        wrong = sorted(s for s, v in crash_losses.items() if ref.get(s) != v)
        if wrong:
            problems.append(f"the crash run's losses differ from the reference's at {wrong}")
        if start != step - args.save_every:
            problems.append(f"resumed at step {start}, not from {before}")
        want = {s: ref[s] for s in range(start + 1, args.steps + 1) if s in ref}
        bad = sorted(s for s in set(want) | set(got) if got.get(s) != want.get(s))
        if bad:
            problems.append(f"the resumed run's losses differ from the reference's at {bad}")
        if got_params != ref_params:
            problems.append(f"final parameters differ: {got_params} vs {ref_params}")
        end = json.loads(c.helper("store-inspect", c.endpoint, "crash"))
        report["end"] = end
        _log(
            f"end: the store holds tags {end['tags']}, latest {end['latest']}, uncommitted "
            f"{end['uncommitted']}, unfinished uploads {end['uploads']}, locks {end['locks']}"
        )
        last = f"global_step{args.steps}"
        if end["latest"] != last or end["uncommitted"] or end["uploads"] or end["locks"]:
            problems.append(f"the store is not clean after the resumed run: {end}")
        if not end["verified"] or not all(end["verified"].values()):
            problems.append(f"verify_checkpoint found problems at the end: {end['verified']}")
        if problems:
            raise RuntimeError("; ".join(problems))
        report["ok"] = True
        report["seconds"] = round(time.monotonic() - started, 1)
        _log(
            f"ok: losses of steps 1..{max(crash_losses)} on 2 nodes x 2 ranks and of steps "
            f"{start + 1}..{args.steps} resumed on 3 ranks are the uninterrupted run's, bit "
            f"for bit, and so are the final parameters ({report['seconds']} s)"
        )
        return report
    finally:
        c.down()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: everything removed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    helpers = {
        "store-ready": store_ready,
        "store-watch": store_watch,
        "store-inspect": store_inspect,
    }
    if argv and argv[0] in helpers:
        return helpers[argv[0]](argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps")
    ap.add_argument("--save-every", type=int, default=2, help="save every k steps")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width (the state's size)")
    ap.add_argument("--lease", type=float, default=5.0, help="lock lease on the store (s)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a run may take")
    ap.add_argument("--grace", type=float, default=60, help="seconds node0 gets to fail")
    ap.add_argument(
        "--reference-nodes",
        type=int,
        choices=(1, 2),
        default=1,
        help="the uninterrupted run: 1 rank on node0, or 2 nodes x 2 ranks",
    )
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = ap.parse_args(argv)
    if args.steps < 3 * args.save_every:
        ap.error("--steps must allow three saves")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _terminate)
    report: dict[str, Any] = {}
    try:
        report = orchestrate(args, report)
    except RuntimeError as e:
        print(f"[multinode] FAILED: {e}", file=sys.stderr, flush=True)
        report.update(ok=False, error=str(e))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
