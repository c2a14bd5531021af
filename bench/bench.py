#!/usr/bin/env python3
"""regcache benchmark (issue 4): driven by bench/run, which installs the tools,
builds regcache and owns the work directory.

Starts, all on loopback ports BENCH_PORT_BASE.. (default 19000..19030):
  - three docker-registry (distribution 2.8) processes on one shared storage
    root: the upstream proper (seeding, direct pulls) and one upstream front
    per cache, each with its own access log, so every upstream request a cache
    makes is counted exactly and attributed to that cache;
  - regcache (supervisor + one worker) in front of its upstream front;
  - docker-registry in proxy mode (registry:2 proxy) in front of its front;
  - nginx serving the same blob and manifest files statically (the ceiling).
Then measures and prints one table. Standard library only.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MIB = 1024 * 1024


def env_int(name, default, lo, hi):
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        sys.exit(f"bench: {name}={raw!r} is not an integer")
    if not lo <= v <= hi:
        sys.exit(f"bench: {name}={v} out of range {lo}..{hi}")
    return v


BLOB_MIB = env_int("BENCH_BLOB_MIB", 256, 1, 4096)
COLD_MIB = env_int("BENCH_COLD_MIB", BLOB_MIB, 1, 4096)
PASSES = env_int("BENCH_PASSES", 3, 1, 20)
# A small pull takes ~40 ms, where one scheduling hiccup of a 2-core machine
# is 10-20 ms: more passes, at ~6 s each (12 pulls; each cache's upstream log
# settles after its pull).
SMALL_PASSES = env_int("BENCH_SMALL_PASSES", 21, 1, 50)
# A warm 256 MiB GET takes ~0.1 s: three of them sample a busy moment as much
# as the server, so the row takes more (interleaved, all targets alike).
WARM_PASSES = env_int("BENCH_WARM_PASSES", 9, 1, 50)
WRK_SECONDS = env_int("BENCH_WRK_SECONDS", 5, 1, 60)
WRK_THREADS = env_int("BENCH_WRK_THREADS", 2, 1, 64)
WRK_CONNS = env_int("BENCH_WRK_CONNS", 32, 1, 1024)
COLD_CLIENTS = env_int("BENCH_COLD_CLIENTS", 16, 1, 64)
TAG_FRESHNESS = env_int("BENCH_TAG_FRESHNESS", 60, 1, 600)
AFTER_WINDOW = env_int("BENCH_AFTER_WINDOW", 1, 0, 1)
PORT_BASE = env_int("BENCH_PORT_BASE", 19000, 19000, 19060)

P_UP = PORT_BASE + 0  # upstream: seeding and direct pulls
P_UP_RC = PORT_BASE + 1  # upstream front counted for regcache
P_UP_R2 = PORT_BASE + 2  # upstream front counted for registry:2 proxy
P_UP_NX = PORT_BASE + 5  # upstream front counted for nginx proxy_cache
P_NX = PORT_BASE + 21  # nginx proxy_cache
P_RC = PORT_BASE + 10  # regcache
P_R2 = PORT_BASE + 20  # registry:2 proxy
P_NGX = PORT_BASE + 30  # nginx static
P_UP_S3 = PORT_BASE + 3  # upstream front counted for regcache on S3 (both nodes)
P_RC_S3 = PORT_BASE + 11  # regcache on S3, node 1
P_RC_S3B = PORT_BASE + 12  # regcache on S3, node 2 (same bucket, its own disk)
P_S3 = PORT_BASE + 40  # the S3 server (s3s-fs)
S3_SERVER = os.environ.get("BENCH_S3_SERVER", "")  # s3s-fs binary; empty: no S3 phase
COMPARE = os.environ.get("BENCH_COMPARE", "")  # "NAME=BINARY ...": compare regcache builds (compare())
P_RC_IDX = PORT_BASE + 13  # regcache started on a store of INDEX_BLOBS blobs
P_RC_NOUSE = PORT_BASE + 14  # regcache with REGCACHE_RECORD_USE=false
P_RC_IDLE = PORT_BASE + 18  # regcache with the embedded default CONFIG, idle
INDEX_BLOBS = env_int("BENCH_INDEX_BLOBS", 100_000, 0, 1_000_000)
P_UP_CL = PORT_BASE + 4  # upstream front counted for the cluster
P_UP_TLS = PORT_BASE + 6  # the upstream over TLS (its own certificate)
P_RC_TLS = PORT_BASE + 19  # regcache in front of it
TLS = env_int("BENCH_TLS", 1, 0, 1)
P_RC_CL = PORT_BASE + 15  # cluster replicas: 15, 16, 17; their peer listeners 50, 51, 52
CLUSTER = env_int("BENCH_CLUSTER", 1, 0, 1)
# The run's processes share one memory cgroup of this many MiB (0: none), so
# new page-cache pages come from reclaiming the run's own older ones, as on a
# cache host whose memory is full or in a container with a memory limit, not
# from free memory a VM may have handed back to its host (MemoryCgroup).
MEMORY_MIB = env_int("BENCH_MEMORY_MIB", max(1024, 16 * BLOB_MIB), 0, 1 << 20)
CGROUP = None  # the MemoryCgroup of the run, once main() made it

REPO = "bench/app"
COLD_REPO = "bench/cold"
# Cold pulls of small images, each kind a fresh image per pass: (kind, repo,
# how regcache names it when it differs from the repository, tag prefix: the
# tags name the images in the one OCI layout, so each kind has its own).
SMALL_KINDS = (("small image, one layer", "bench/small", None, "a"),
               ("multi-arch index", "bench/multi", None, "m"),
               ("Docker Hub-style library/ image", "library/benchlib", "benchlib", "l"))
CACHES = ("regcache", "registry2", "nginx-cache")
RC_PREFIX = "upstream.test"

WORK = None
REGCACHE = None
PIDFILE = None
PROCS = []  # (name, Popen)
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


def start(name, argv, env=None, stdout=None, stderr=None):
    """Start a service in its own process group; bench/run's trap kills the
    groups listed in PIDFILE if this script dies without cleaning up."""
    out = open(stdout or os.path.join(WORK, "logs", f"{name}.out"), "ab")
    err = open(stderr, "ab") if stderr else subprocess.STDOUT
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        env=env,
        start_new_session=True,
    )
    out.close()
    if err is not subprocess.STDOUT:
        err.close()
    PROCS.append((name, p))
    with open(PIDFILE, "a") as f:
        f.write(f"{p.pid}\n")
    return p


def text_layout(binary):
    """How much of the binary's code link/hot-text.ld placed first: near 0
    means the file is stale (scripts/order-text) and memory figures suffer."""
    try:
        out = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return f"unknown ({e})"
    size = {}
    for line in out.splitlines():
        f = line.split("]", 1)[-1].split()
        if len(f) > 4 and f[0] in (".text", ".text.hot", ".text.tls"):
            size[f[0]] = int(f[4], 16)
    hot, tls, rest = size.get(".text.hot", 0), size.get(".text.tls", 0), size.get(".text", 0)
    return (f"{hot // 1024} KiB of {(hot + tls + rest) // 1024} KiB placed first by link/hot-text.ld, "
            f"{tls // 1024} KiB of TLS after it"
            f"{'' if hot else ' (none: not a release build, or no function of the file matched)'}")


def stop_all():
    for _, p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for _, p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for _, p in PROCS:
        try:  # the group too: children that outlived their parent
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    PROCS.clear()


def stop(p):
    """Stops one service before the end of the run (and forgets it, so that
    check_alive does not take it for a crash)."""
    p.terminate()
    p.wait(timeout=30)
    PROCS[:] = [(n, q) for n, q in PROCS if q is not p]


def check_alive():
    for name, p in PROCS:
        if p.poll() is not None:
            raise BenchError(f"{name} exited with {p.returncode}; see {WORK}/logs/")


def port_free(port):
    s = socket.socket()
    try:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        s.close()


def http_status(url, method="GET", headers=None, timeout=2):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    # Only the bench's own TLS upstream is asked over https: its readiness.
    import ssl
    unverified = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=unverified) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_ready(name, url, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode} while starting; see {WORK}/logs/")
        try:
            st, _, _ = http_status(url, timeout=1)
            if st == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{name} not ready at {url} after {timeout}s")


def run(argv, timeout, env=None, check=True):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {' '.join(argv)}")
    if check and r.returncode != 0:
        raise BenchError(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stderr.strip()}")
    return r


def tree_pids(root):
    """root and all its descendants (by ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def status_kib(pid, *keys):
    got = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in got:
                    got[k] = int(line.split()[1])
    except OSError:
        pass
    return [got[k] for k in keys]


def tree_hwm_mib(root):
    return sum(vm_hwm_kib(p) for p in tree_pids(root)) / 1024


def smaps_rollup_kib(pid):
    """{field: KiB} of /proc/PID/smaps_rollup ("Pss", "Pss_Anon", ...)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                v = line.split()
                if len(v) == 3 and v[2] == "kB":
                    out[v[0].rstrip(":")] = int(v[1])
    except (OSError, ValueError):
        pass
    return out


def pss_kib(pid):
    """Proportional set size: shared pages split among the processes that
    map them, so a sum over processes counts each page once."""
    return smaps_rollup_kib(pid).get("Pss", 0)


def tree_pss_mib(root):
    return sum(pss_kib(p) for p in tree_pids(root)) / 1024


class PssPeaks:
    """Samples the PSS of each process tree every 0.2 s in a thread; PSS has
    no kernel-kept peak like VmHWM, so the peak is the largest sample. The
    trees are re-read every 2 s only (a /proc walk costs more than a sample)."""

    def __init__(self, roots):
        import threading
        self.roots, self.peak = roots, dict.fromkeys(roots, 0.0)
        self.pids, self.samples, self.parts = {}, 0, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.2):
            self.sample()

    def sample(self):
        if self.samples % 10 == 0:
            self.pids = {k: tree_pids(root) for k, root in self.roots.items()}
        self.samples += 1
        for k, pids in self.pids.items():
            rollups = [smaps_rollup_kib(p) for p in pids]
            total = sum(r.get("Pss", 0) for r in rollups) / 1024
            if total > self.peak[k]:
                self.peak[k] = total
                # Where the peak is: each process's anonymous and file-backed
                # (mostly code) PSS, in tree order (regcache: supervisor first).
                self.parts[k] = [(r.get("Pss_Anon", 0) / 1024, r.get("Pss_File", 0) / 1024) for r in rollups]

    def finish(self):
        self.stop.set()
        self.thread.join()
        self.sample()
        return self.peak


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def cpu_snapshot(root):
    """{pid: CPU seconds} for root and its descendants."""
    clk = os.sysconf("SC_CLK_TCK")
    return {p: cpu_ticks(p) / clk for p in tree_pids(root)}


def cpu_delta(before, after):
    """[(pid, seconds)] in tree order (root first)."""
    return [(p, after[p] - before.get(p, 0.0)) for p in after]


def cpu_busy_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2], sum(v[:8])


REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def reported_kib():
    """KiB of free memory this guest has handed back to its host so far
    (free page reporting; None where the kernel does not say): memory
    handed back costs a fault on the host when it is next written."""
    try:
        with open(REPORTED_KIB) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class MemoryCgroup:
    """This process, and so every process it starts from now on, in a memory
    cgroup of its own limited to `mib` MiB (cgroup v2, else v1's memory
    controller), so that new page-cache pages come from reclaiming the run's
    own, not from free memory a VM may have handed back to its host (the
    figures are in bench/README). `why` says why not where it cannot be
    (not root, no memory controller, the work directory on tmpfs, whose
    files the limit could not reclaim)."""

    def __init__(self, mib, work):
        self.path, self.home, self.why = None, None, ""
        if not mib:
            self.why = "no limit (BENCH_MEMORY_MIB=0)"
            return
        if mount_type(work) == "tmpfs":
            self.why = f"no limit: {work} is on tmpfs, whose files a memory limit cannot reclaim"
            return
        name = f"regcache-bench-{os.getpid()}"
        try:
            if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                # Under the root: a v2 cgroup with processes of its own (a
                # login session's) cannot give its children a controller.
                base, limit_file = "/sys/fs/cgroup", "memory.max"
                self.home = base + own_cgroup("")
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    if "memory" not in f.read().split():
                        write_file(os.path.join(base, "cgroup.subtree_control"), "+memory")
            else:
                base, limit_file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
                base += own_cgroup("memory")
                self.home = base
            path = os.path.join(base, name)
            os.mkdir(path)
            self.path = path
            write_file(os.path.join(path, limit_file), str(mib * MIB))
            write_file(os.path.join(path, "cgroup.procs"), str(os.getpid()))
            self.limit = mib * MIB
            self.usage_file = os.path.join(path, "memory.current" if limit_file == "memory.max"
                                           else "memory.usage_in_bytes")
        except OSError as e:
            self.why = f"no limit: memory cgroup not available ({e.strerror}: {e.filename})"
            self.leave()
            return
        self.why = f"the run's processes in a memory cgroup of {mib} MiB (BENCH_MEMORY_MIB; 0: none)"

    def top_up(self, d):
        """Fills the cgroup up to its limit (less 256 MiB) with one file that
        is never read again, written out so that its pages are clean, so the
        measures' new pages come from reclaiming it however little the data
        before them took. Returns the MiB written."""
        if self.path is None:
            return 0
        with open(self.usage_file) as f:
            room = (self.limit - int(f.read())) // MIB - 256
        room = min(room, mem_available_mib() - 1024)  # a limit above the machine's memory is none
        if room <= 0:
            return 0
        chunk = b"\0" * MIB
        with open(os.path.join(d, "memory-filler"), "wb", buffering=0) as f:
            for _ in range(room):
                f.write(chunk)
            os.fsync(f.fileno())
        return room

    def leave(self):
        """Back to the cgroup this process came from; the cgroup goes once
        the processes started in it have ended."""
        if self.path is None:
            return
        try:
            write_file(os.path.join(self.home, "cgroup.procs"), str(os.getpid()))
            os.rmdir(self.path)
        except OSError as e:
            log(f"memory cgroup {self.path} left behind: {e.strerror}")
        self.path = None


def fill_memory():
    """MemoryCgroup.top_up before the measures, said in the run's log and
    in the memory line of the details."""
    mib = CGROUP.top_up(WORK)
    if mib:
        CGROUP.why += f", {mib} MiB of it filled before the measures by a file never read again"
        log(f"memory: {mib} MiB filled")


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def own_cgroup(controller):
    """This process's cgroup path for `controller` (v1) or in the unified
    hierarchy (""), from /proc/self/cgroup."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(",") or (controller == "" and names == ""):
                return path.rstrip("/")
    raise OSError(0, "no such cgroup line", "/proc/self/cgroup")


def mount_type(path):
    """The file system type of the mount holding `path`."""
    path, best, kind = os.path.realpath(path), "", ""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------
# test data: an OCI layout written directly, pushed with skopeo
# ---------------------------------------------------------------------------


class Layout:
    def __init__(self, path):
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        self.refs = []

    def put_bytes(self, data):
        hexd = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, hexd), "wb") as f:
            f.write(data)
        return "sha256:" + hexd, len(data)

    def put_random_tar(self, name, size):
        """An uncompressed tar holding one file of `size` random bytes,
        streamed to disk and hashed on the way (its digest is its diff_id)."""
        tmp = os.path.join(self.path, "tmp-layer")
        h = hashlib.sha256()
        total = 0
        ti = tarfile.TarInfo(name)
        ti.size = size
        ti.mtime = 1704067200
        ti.mode = 0o644
        with open(tmp, "wb") as f:

            def w(b):
                nonlocal total
                f.write(b)
                h.update(b)
                total += len(b)

            w(ti.tobuf(format=tarfile.USTAR_FORMAT))
            left = size
            while left:
                n = min(left, 4 * MIB)
                w(os.urandom(n))
                left -= n
            w(b"\0" * ((512 - size % 512) % 512 + 1024))
        hexd = h.hexdigest()
        os.rename(tmp, os.path.join(self.blobs, hexd))
        return "sha256:" + hexd, total

    def image(self, tag, layer_sizes, arch="amd64"):
        layers = [self.put_random_tar(f"{tag}-layer{i}.bin", s) for i, s in enumerate(layer_sizes)]
        config = json.dumps(
            {
                "created": "2024-01-01T00:00:00Z",
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"regcache.bench": tag + os.urandom(8).hex()}},
                "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
                "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "regcache bench"} for _ in layers],
            }
        ).encode()
        cdig, csize = self.put_bytes(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cdig, "size": csize},
                "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
            }
        ).encode()
        mdig, msize = self.put_bytes(manifest)
        self.refs.append({"mediaType": OCI_MANIFEST, "digest": mdig, "size": msize,
                          "annotations": {"org.opencontainers.image.ref.name": tag}})
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.refs}, f)
        return {"tag": tag, "manifest": mdig, "manifest_size": msize, "config": cdig, "layers": layers}

    def index(self, tag, layer_sizes, archs=("amd64", "arm64")):
        """An OCI index of one image per architecture (a pull takes the amd64 one)."""
        images = [self.image(f"{tag}-{a}", layer_sizes, arch=a) for a in archs]
        index = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": im["manifest"], "size": im["manifest_size"],
                           "platform": {"architecture": a, "os": "linux"}} for im, a in zip(images, archs)],
        }).encode()
        idig, isize = self.put_bytes(index)
        self.refs.append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idig, "size": isize,
                          "annotations": {"org.opencontainers.image.ref.name": tag}})
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.refs}, f)
        return {"tag": tag, "manifest": idig}

    def blob_path(self, digest):
        return os.path.join(self.blobs, digest.split(":", 1)[1])


def skopeo_base():
    d = os.path.join(WORK, "skopeo")
    return ["skopeo", "--registries-conf", os.path.join(d, "registries.conf"),
            "--policy", os.path.join(d, "policy.json"), "--tmpdir", os.path.join(d, "tmp")]


def skopeo_env():
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env["REGISTRY_AUTH_FILE"] = os.path.join(WORK, "skopeo", "auth.json")
    return env


def setup_skopeo():
    d = os.path.join(WORK, "skopeo")
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    with open(os.path.join(d, "registries.conf"), "w") as f:
        f.write('unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
    with open(os.path.join(d, "policy.json"), "w") as f:
        f.write('{"default":[{"type":"insecureAcceptAnything"}]}')


def push(layout, tag, repo):
    run(skopeo_base() + ["copy", "-q", "--all", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds",
                         f"oci:{layout.path}:{tag}", f"docker://127.0.0.1:{P_UP}/{repo}:{tag}"],
        timeout=600, env=skopeo_env())


def pull(ref, label, upstream=None):
    """skopeo copy docker://REF dir:fresh (skopeo checks every digest);
    returns seconds. With `upstream` (a pid) returns (seconds, Flow): what
    skopeo read and that upstream's tree wrote, every 10 ms."""
    dest = os.path.join(WORK, "pulls", label)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    argv = skopeo_base() + ["copy", "-q", "--src-tls-verify=false", "--src-no-creds",
                            f"docker://{ref}", f"dir:{dest}"]
    t = time.monotonic()
    if upstream is None:
        run(argv, timeout=600, env=skopeo_env())
    else:
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=skopeo_env()) as p:
            flow = Flow(p.pid, upstream)
            try:
                _, err = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                raise BenchError(f"timed out after 600s: {' '.join(argv)}")
            finally:
                flow.finish()
        if p.returncode != 0:
            raise BenchError(f"failed ({p.returncode}): {' '.join(argv)}\n{err.strip()}")
    secs = time.monotonic() - t
    shutil.rmtree(dest, ignore_errors=True)
    return secs if upstream is None else (secs, flow)


def io_bytes(pid, field):
    """`rchar` or `wchar` of /proc/PID/io: bytes through read and write
    calls, sockets and sendfile included; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, v = line.split(":")
                if k == field:
                    return int(v)
    except OSError:
        pass
    return 0


class Flow:
    """What a client has read and what an upstream's tree has written, every
    10 ms: on 2 cores a cache's fill takes CPU from the client while it runs,
    and rates() shows how much."""

    def __init__(self, client, upstream):
        import threading
        self.client, self.upstream = client, [upstream]
        self.t0, self.samples = time.monotonic(), []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.upstream = tree_pids(self.upstream[0])  # on this thread: the pull has begun
        while True:
            self.samples.append((time.monotonic() - self.t0, io_bytes(self.client, "rchar"),
                                 sum(io_bytes(p, "wchar") for p in self.upstream)))
            if self.stop.wait(0.01):
                return

    def finish(self):
        self.stop.set()
        self.thread.join()

    def rates(self, size):
        """(MB/s the client read while the upstream still sent a `size`
        blob, MB/s after that or None, seconds into the pull the upstream was
        done): from its first MiB out to its last, and on to the client's
        last byte; "after" only if a tenth of the blob or more was left."""
        s = self.samples
        c0, u0 = s[0][1], s[0][2]
        start = next((x for x in s if x[2] - u0 >= MIB), None)
        done = next((x for x in s if x[2] - u0 >= size), None)
        if start is None or done is None or done[0] <= start[0]:
            return None
        end = next((x for x in s if x[1] - c0 >= size), s[-1])
        during = (done[1] - start[1]) / (done[0] - start[0]) / 1e6
        rest = end[1] - done[1]
        after = rest / (end[0] - done[0]) / 1e6 if rest >= size / 10 and end[0] > done[0] else None
        return during, after, done[0]


def page_cost(d, files=4):
    """CPU seconds to write BLOB_MIB MiB into each of `files` new files in a
    row, all kept until the last is written: what new page-cache pages cost
    on this machine. With no memory limit (MemoryCgroup) the first may land
    in memory freed a moment before (skopeo's last pull), later ones in
    memory not used lately, which a VM whose host takes freed memory back
    fills several times more slowly."""
    os.makedirs(d, exist_ok=True)
    chunk = b"\1" * MIB
    costs = []
    try:
        for i in range(files):
            t = time.process_time()
            with open(os.path.join(d, str(i)), "xb", buffering=0) as f:
                for _ in range(BLOB_MIB):
                    f.write(chunk)
            costs.append(time.process_time() - t)
    finally:
        shutil.rmtree(d, ignore_errors=True)  # before writeback: no disk I/O after
    return costs


def children_cpu_seconds():
    t = os.times()
    return t.children_user + t.children_system


def pull_cpu(ref, label, upstream, cache=None):
    """pull(), the CPU seconds it cost: [skopeo's, the `cache` tree's (if
    any), the `upstream` tree's], the cache's per process, and its Flow."""
    trees = [r for r in (cache, upstream) if r]
    before = [cpu_snapshot(r) for r in trees]
    k0 = children_cpu_seconds()
    secs, flow = pull(ref, label, upstream)
    skopeo = children_cpu_seconds() - k0
    per = [[t for _, t in cpu_delta(b, cpu_snapshot(r))] for b, r in zip(before, trees)]
    return secs, [skopeo, *map(sum, per)], per[0] if cache else [], flow


# ---------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------


def registry_config(path, port, root, access_log, proxy=None, tls=None):
    # The registry:2 image's own config (cmd/registry/config-example.yml) with
    # paths and port adapted; the upstream fronts keep the access log.
    cfg = (
        "version: 0.1\n"
        "log:\n  level: info\n  fields:\n    service: registry\n"
        f"  accesslog:\n    disabled: {'false' if access_log else 'true'}\n"
        "storage:\n  cache:\n    blobdescriptor: inmemory\n"
        f"  filesystem:\n    rootdirectory: {root}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-bench-secret\n"
        "  headers:\n    X-Content-Type-Options: [nosniff]\n"
    )
    if tls:
        cfg += f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
    if proxy:
        cfg += f"proxy:\n  remoteurl: {proxy}\n"
    with open(path, "w") as f:
        f.write(cfg)


def start_registry(name, port, root, proxy=None, access_log=True, tls=None):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.yml")
    registry_config(cfg, port, root, access_log, proxy, tls)
    # distribution writes the access log (combined format) to stdout and its
    # own log to stderr.
    p = start(name, ["docker-registry", "serve", cfg],
              stdout=os.path.join(d, "access.log"), stderr=os.path.join(WORK, "logs", f"{name}.log"))
    wait_ready(name, f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/", p, timeout=30)
    return p


ACCESS_RE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')


def access_entries(name):
    """(method, path, status) of every request the registry `name` answered."""
    try:
        with open(os.path.join(WORK, name, "access.log"), errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [m.groups() for m in ACCESS_RE.finditer(text)]


def settled_entries(name, quiet=0.6, timeout=15):
    """Access entries once the log has stopped growing for `quiet` s: a line is
    written when a request completes, shortly after the client saw the end."""
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = access_entries(name)
        if last is None or len(e) != len(last):
            last, since = e, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return e
        time.sleep(0.1)
    return last


def describe_requests(entries):
    """'GET /v2/ + HEAD manifests/p1' style summary."""
    parts = []
    for m, path, st in entries:
        p = re.sub(r"^/v2/[^?]*?/(manifests|blobs)/", r"\1/", path)
        p = re.sub(r"sha256:([0-9a-f]{8})[0-9a-f]+", r"sha256:\1..", p)
        parts.append(f"{m} {p}" + ("" if st.startswith("2") else f" ->{st}"))
    return " + ".join(parts) if parts else "none"


def group_requests(entries):
    """'GET /v2/ x9, HEAD blobs x4, ...' in order of first appearance."""
    counts = {}
    for m, path, st in entries:
        if path.split("?")[0] == "/v2/":
            kind = "/v2/"
        elif "/manifests/sha256:" in path:
            kind = "manifests/<digest>"
        elif "/manifests/" in path:
            kind = "manifests/<tag>"
        elif "/blobs/" in path:
            kind = "blobs"
        else:
            kind = path
        key = f"{m} {kind}" + ("" if st.startswith("2") else f" ->{st}")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "none"


def start_regcache(name="regcache", port=P_RC, upstream=P_UP_RC, extra_env=None, scheme="http", binary=None):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ)
    env["CONFIG"] = json.dumps([{"registry": f"{scheme}://127.0.0.1:{upstream}", "aliases": [RC_PREFIX, "docker.io"]}])
    env["REGCACHE_TAG_FRESHNESS"] = f"{TAG_FRESHNESS}s"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "REGCACHE_LISTEN", "REGCACHE_STORAGE"):
        env.pop(k, None)
    env.update(extra_env or {})
    p = start(name, [binary or REGCACHE, "--listen", f"127.0.0.1:{port}", "--storage", os.path.join(d, "data")],
              env=env, stdout=os.path.join(WORK, "logs", f"{name}.log"))
    wait_ready(name, f"http://127.0.0.1:{port}/v2/", p, timeout=60)
    return p


def start_s3():
    """s3s-fs (an S3 server on a directory) with one bucket, and the
    REGISTRY_STORAGE_S3_* settings of a regcache on it."""
    root = os.path.join(WORK, "s3")
    os.makedirs(os.path.join(root, "regcache"), exist_ok=True)
    p = start("s3", [S3_SERVER, "--host", "127.0.0.1", "--port", str(P_S3), "--access-key", "bench",
                     "--secret-key", "bench-secret", root])
    deadline = time.monotonic() + 30
    while port_free(P_S3):
        if p.poll() is not None or time.monotonic() > deadline:
            raise BenchError("s3s-fs did not start (logs/s3.out)")
        time.sleep(0.1)
    return {"REGISTRY_STORAGE": "s3", "REGISTRY_STORAGE_S3_REGIONENDPOINT": f"http://127.0.0.1:{P_S3}",
            "REGISTRY_STORAGE_S3_REGION": "us-east-1", "REGISTRY_STORAGE_S3_BUCKET": "regcache",
            "REGISTRY_STORAGE_S3_ACCESSKEY": "bench", "REGISTRY_STORAGE_S3_SECRETKEY": "bench-secret",
            "REGISTRY_STORAGE_REDIRECT_DISABLE": "true"}


def write_store(root, blobs, per_manifest=100):
    """A store of `blobs` small blobs and one image manifest (with a tag) per
    `per_manifest` of them, in regcache's filesystem layout, written
    directly (as a long-running cache would have it)."""
    digests = []
    for i in range(blobs):
        data = f"regcache bench blob {i}\n".encode()
        hexd = hashlib.sha256(data).hexdigest()
        d = os.path.join(root, "blobs", "sha256", hexd[:2])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, hexd), "wb") as f:
            f.write(data)
        digests.append((hexd, len(data)))
    tags = os.path.join(root, "repositories", "bench", "index", "_tags")
    os.makedirs(tags, exist_ok=True)
    for j in range(0, blobs, per_manifest):
        layers = [{"mediaType": OCI_LAYER, "digest": "sha256:" + h, "size": n}
                  for h, n in digests[j:j + per_manifest]]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": layers[0],
                           "layers": layers[1:]}).encode()
        hexd = hashlib.sha256(body).hexdigest()
        d = os.path.join(root, "manifests", "sha256", hexd[:2])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, hexd), "wb") as f:
            f.write(OCI_MANIFEST.encode() + b"\n" + body)
        with open(os.path.join(tags, f"t{j}"), "w") as f:
            f.write(f"sha256:{hexd}\n{int(time.time() * 1000)}\n")


def timed_start(name, port, extra_env):
    """Starts a regcache; (seconds to its first 200 on /v2/, process)."""
    d = os.path.join(WORK, name)
    env = dict(os.environ)
    env["CONFIG"] = json.dumps([{"registry": f"http://127.0.0.1:{P_UP_RC}", "aliases": [RC_PREFIX]}])
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "REGCACHE_LISTEN", "REGCACHE_STORAGE"):
        env.pop(k, None)
    env.update(extra_env)
    t = time.monotonic()
    p = start(name, [REGCACHE, "--listen", f"127.0.0.1:{port}", "--storage", os.path.join(d, "data")],
              env=env, stdout=os.path.join(WORK, "logs", f"{name}.log"))
    url = f"http://127.0.0.1:{port}/v2/"
    while True:
        if p.poll() is not None:
            raise BenchError(f"{name} exited while starting; see logs/{name}.log")
        try:
            if http_status(url, timeout=1)[0] == 200:
                return time.monotonic() - t, p
        except OSError:
            pass
        if time.monotonic() - t > 60:
            raise BenchError(f"{name} not ready after 60 s")
        time.sleep(0.005)


def index_phase(R, images, rc_pid):
    """Start-up on a store of INDEX_BLOBS blobs beside start-up on an empty
    one, how long the background index takes, and the warm path with
    last-use bookkeeping on (the main regcache) and off."""
    X = {}
    empty_s, p = timed_start("regcache-empty", P_RC_IDX, {"REGCACHE_MAX_SIZE": "1TiB"})
    stop(p)
    root = os.path.join(WORK, "regcache-index", "data", f"127.0.0.1_{P_UP_RC}")
    log(f"index phase: writing a store of {INDEX_BLOBS} blobs")
    write_store(root, INDEX_BLOBS)
    # Cold page cache for the directories would be fairer but needs root;
    # the files were just written, as after a restart on a busy host.
    ready_s, p = timed_start("regcache-index", P_RC_IDX, {"REGCACHE_MAX_SIZE": "1TiB"})
    t = time.monotonic()
    built = None
    while time.monotonic() - t < 120:
        _, _, body = http_status(f"http://127.0.0.1:{P_RC_IDX}/metrics", timeout=5)
        if re.search(rb"^regcache_cache_index_ready\{[^}]*\} 1$", body, re.M):
            built = time.monotonic() - t + ready_s
            m = re.search(rb"^regcache_cache_blobs\{[^}]*\} (\d+)$", body, re.M)
            X["indexed_blobs"] = int(m.group(1)) if m else -1
            break
        time.sleep(0.02)
    with open(os.path.join(WORK, "logs", "regcache-index.log"), errors="replace") as f:
        m = re.search(r"cache index built in (\d+) ms", f.read())
    X.update(empty_start=empty_s, start=ready_s, index_built=built,
             scan_ms=int(m.group(1)) if m else None, rss=tree_hwm_mib(p.pid))
    stop(p)

    # Bookkeeping off: same image, warmed, then wrk and blob GETs interleaved
    # with the main regcache (bookkeeping on).
    _, nouse = timed_start("regcache-nouse", P_RC_NOUSE, {"REGCACHE_RECORD_USE": "false"})
    im = images[0]
    pull(f"127.0.0.1:{P_RC_NOUSE}/{RC_PREFIX}/{REPO}:{im['tag']}", "nouse-cold")
    mdig = im["manifest"]
    urls = {"on": f"http://127.0.0.1:{P_RC}/v2/{RC_PREFIX}/{REPO}/manifests/{mdig}",
            "off": f"http://127.0.0.1:{P_RC_NOUSE}/v2/{RC_PREFIX}/{REPO}/manifests/{mdig}"}
    rps = {"on": [], "off": []}
    for _ in range(PASSES):
        for k, u in urls.items():
            rps[k].append(wrk(u, headers=[f"Accept: {OCI_MANIFEST}"])["rps"])
    big, big_size = im["layers"][0]
    blobs = {"on": (f"http://127.0.0.1:{P_RC}/v2/{RC_PREFIX}/{REPO}/blobs/{big}", rc_pid),
             "off": (f"http://127.0.0.1:{P_RC_NOUSE}/v2/{RC_PREFIX}/{REPO}/blobs/{big}", nouse.pid)}
    mb = warm_blobs(blobs, big_size)
    X.update(rps_on=statistics.median(rps["on"]), rps_off=statistics.median(rps["off"]),
             rps_all=rps, blob_on=mb["on"][0], blob_off=mb["off"][0])
    stop(nouse)
    R["index"] = X
    log(f"index: start {ready_s:.3f}s with {INDEX_BLOBS} blobs (empty {empty_s:.3f}s), index built "
        f"{built if built is None else round(built, 2)}s; manifest req/s bookkeeping on "
        f"{X['rps_on']:.0f} off {X['rps_off']:.0f}")


def idle_phase(R):
    """regcache as the README's first command runs it: the embedded default
    CONFIG (every public registry), offline so that nothing waits for the
    internet; its PSS once ready and settled."""
    d = os.path.join(WORK, "regcache-idle")
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "CONFIG_FILE", "REGCACHE_LISTEN")}
    env["REGCACHE_OFFLINE"] = "true"
    p = start("regcache-idle", [REGCACHE, "--listen", f"127.0.0.1:{P_RC_IDLE}", "--storage", os.path.join(d, "data")],
              env=env, stdout=os.path.join(WORK, "logs", "regcache-idle.log"))
    wait_ready("regcache-idle", f"http://127.0.0.1:{P_RC_IDLE}/v2/", p, timeout=60)
    time.sleep(2)
    R["idle"] = {"pss": tree_pss_mib(p.pid), "procs": len(tree_pids(p.pid))}
    stop(p)


def cluster_phase(images, R, s3_env):
    """Three replicas of one cluster (on the S3 server when there is one),
    the same cold image pulled through all three at once: upstream bytes
    against the image's size, and the slowest pull against one cold pull of
    the same size through a single regcache (the main run's)."""
    start_registry("upstream-cl", P_UP_CL, os.path.join(WORK, "upstream-data"))
    peers = ",".join(f"127.0.0.1:{PORT_BASE + 50 + i}" for i in range(3))
    for i in range(3):
        env = dict(s3_env)
        env.update(REGCACHE_PEER_LISTEN=f"127.0.0.1:{PORT_BASE + 50 + i}", REGCACHE_PEERS=peers,
                   REGCACHE_PEER_SECRET="bench-cluster-secret-0123456789")
        start_regcache(f"regcache-cl{i}", P_RC_CL + i, P_UP_CL, env)
    for i in range(3):
        t = time.monotonic()
        while b"cluster: 3 members" not in http_status(f"http://127.0.0.1:{P_RC_CL + i}/readyz")[2]:
            if time.monotonic() - t > 30:
                raise BenchError(f"cluster replica {i} never saw 3 members")
            time.sleep(0.2)
    C = {"pull": [], "ratio": [], "gets": []}
    for im in images:
        n0 = len(settled_entries("upstream-cl"))
        refs = [f"127.0.0.1:{P_RC_CL + i}/{RC_PREFIX}/{REPO}:{im['tag']}" for i in range(3)]
        t = time.monotonic()
        procs = []
        for i, ref in enumerate(refs):
            dest = os.path.join(WORK, "pulls", f"cluster-{i}")
            shutil.rmtree(dest, ignore_errors=True)
            argv = skopeo_base() + ["copy", "-q", "--src-tls-verify=false", "--src-no-creds",
                                    f"docker://{ref}", f"dir:{dest}"]
            procs.append((subprocess.Popen(argv, env=skopeo_env(), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE), time.monotonic()))
        ends = []
        for p, _ in procs:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise BenchError(f"cluster pull failed: {err.decode(errors='replace')[-500:]}")
            ends.append(time.monotonic() - t)
        C["pull"].append(max(ends))
        sizes = dict(im["layers"])
        e = settled_entries("upstream-cl")[n0:]
        got = [p.rsplit("/", 1)[-1] for m, p, _ in e if m == "GET" and "/blobs/" in p]
        C["gets"].append(len(got))
        image_bytes = sum(sizes.values())
        C["ratio"].append(sum(sizes.get(d, 0) for d in got) / image_bytes)
    R["cluster"] = C
    log(f"cluster: slowest of 3 pulls {', '.join(f'{x:.2f}' for x in C['pull'])}s; upstream bytes / image "
        f"{', '.join(f'{x:.2f}' for x in C['ratio'])}")


def tls_phase(images, R):
    """The upstream over TLS, as every public registry is: a regcache in
    front of it (trusting its certificate through REGCACHE_UPSTREAM_CA_FILE)
    pulls each image cold, beside the same pull straight from the TLS
    upstream; the peak PSS of that regcache meanwhile (its TLS code and
    buffers, which the plain-HTTP upstream of the main run never touches)."""
    d = os.path.join(WORK, "tls")
    os.makedirs(d, exist_ok=True)
    ca, ca_key = os.path.join(d, "ca.pem"), os.path.join(d, "ca-key.pem")
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    run(["openssl", "req", "-x509", *ec, "-subj", "/CN=regcache bench CA", "-keyout", ca_key, "-out", ca],
        timeout=30)
    run(["openssl", "req", "-x509", *ec, "-subj", "/CN=127.0.0.1", "-CA", ca, "-CAkey", ca_key,
         "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE",
         "-keyout", key, "-out", cert], timeout=30)
    start_registry("upstream-tls", P_UP_TLS, os.path.join(WORK, "upstream-data"), tls=(cert, key))
    env = {"REGCACHE_UPSTREAM_CA_FILE": ca}
    if os.environ.get("REGCACHE_TEXT_PROFILE"):
        # scripts/order-text: the code only a TLS upstream runs is placed
        # apart from the rest, so it profiles apart.
        env["REGCACHE_TEXT_PROFILE"] = os.path.join(os.environ["REGCACHE_TEXT_PROFILE"], "tls")
        os.makedirs(env["REGCACHE_TEXT_PROFILE"], exist_ok=True)
    p = start_regcache("regcache-tls", P_RC_TLS, P_UP_TLS, env, scheme="https")
    pss = PssPeaks({"regcache": p.pid})
    T = {"cold": [], "direct": []}
    for im in images:
        check_alive()
        ref = f"{REPO}:{im['tag']}"
        T["direct"].append(pull(f"127.0.0.1:{P_UP_TLS}/{ref}", "tls-direct"))
        T["cold"].append(pull(f"127.0.0.1:{P_RC_TLS}/{RC_PREFIX}/{ref}", "tls-cold"))
        log(f"TLS upstream {im['tag']}: direct {T['direct'][-1]:.2f}s, regcache cold {T['cold'][-1]:.2f}s")
    T["pss"] = pss.finish()["regcache"]
    T["pss_parts"] = pss.parts.get("regcache", [])
    stop(p)
    R["tls"] = T


def s3_phase(images, R):
    """regcache with REGISTRY_STORAGE=s3: node 1 pulls each image cold (fills
    upstream, writes local tier and bucket) and warm (local tier); node 2,
    same bucket but its own empty disk, then pulls it (fills from the
    bucket). Upstream requests are counted on their shared front."""
    s3_env = R["s3_env"]
    start_registry("upstream-s3", P_UP_S3, os.path.join(WORK, "upstream-data"))
    start_regcache("regcache-s3", P_RC_S3, P_UP_S3, s3_env)
    start_regcache("regcache-s3b", P_RC_S3B, P_UP_S3, s3_env)
    S = {k: [] for k in ("cold", "warm", "node2", "cold_reqs", "warm_reqs", "node2_reqs")}
    S["node2_desc"], S["node2_blob_gets"] = "", 0
    for im in images:
        tag = im["tag"]
        for key, port in (("cold", P_RC_S3), ("warm", P_RC_S3), ("node2", P_RC_S3B)):
            check_alive()
            n0 = len(settled_entries("upstream-s3"))
            S[key].append(pull(f"127.0.0.1:{port}/{RC_PREFIX}/{REPO}:{tag}", f"s3-{key}"))
            e = settled_entries("upstream-s3")[n0:]
            S[f"{key}_reqs"].append(len(e))
            if key == "node2":
                S["node2_desc"] = describe_requests(e)
                S["node2_blob_gets"] += sum(1 for m, p, _ in e if m == "GET" and "/blobs/" in p)
        log(f"S3 {tag}: cold {S['cold'][-1]:.2f}s, warm {S['warm'][-1]:.2f}s, "
            f"node 2 {S['node2'][-1]:.2f}s ({S['node2_reqs'][-1]} upstream req)")
    objects = sum(len(fs) for _, _, fs in os.walk(os.path.join(WORK, "s3", "regcache")))
    S["objects"] = objects
    R["s3"] = S


def run_nginx(name, what, http_body, ready_path, port):
    """Writes `name`'s nginx.conf (one prefix directory, all temp paths in it,
    no access log, sendfile) around `http_body` and starts it."""
    d = os.path.join(WORK, name)
    for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "cache"):
        os.makedirs(os.path.join(d, "tmp", t), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""# {what}
user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
{http_body}
}}
""")
    p = start(name, ["nginx", "-p", d, "-e", os.path.join(d, "error.log"), "-c", conf, "-g", "daemon off;"])
    wait_ready(name, f"http://127.0.0.1:{port}{ready_path}", p, timeout=15)
    return p


def start_nginx(layout, image):
    root = os.path.join(WORK, "nginx", "root")
    for sub in ("blobs", "manifests"):
        os.makedirs(os.path.join(root, "v2", REPO, sub), exist_ok=True)
    big = image["layers"][0][0]
    os.link(layout.blob_path(big), os.path.join(root, "v2", REPO, "blobs", big))
    os.link(layout.blob_path(image["manifest"]), os.path.join(root, "v2", REPO, "manifests", image["manifest"]))
    return run_nginx("nginx", "nginx serving the blob and the manifest as static files: the ceiling.", f"""    types {{ }}
    server {{
        listen 127.0.0.1:{P_NGX};
        root {root};
        location /v2/ {{ default_type application/octet-stream; }}
        location ~ /manifests/ {{ default_type {OCI_MANIFEST}; }}
    }}""", f"/v2/{REPO}/manifests/{image['manifest']}", P_NGX)


def start_nginx_cache():
    """nginx as the pull-through cache users build from it: proxy_cache with
    proxy_cache_lock on, content by digest kept 30 days, everything else
    (tags, /v2/) for regcache's tag freshness."""
    d = os.path.join(WORK, "nginx-cache")
    return run_nginx("nginx-cache", "nginx proxy_cache in front of the registry, with proxy_cache_lock on.", f"""\
    proxy_cache_path {d}/tmp/cache levels=1:2 keys_zone=registry:16m max_size=64g inactive=30d use_temp_path=off;
    upstream registry {{ server 127.0.0.1:{P_UP_NX}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{P_NX};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_cache registry;
        proxy_cache_lock on;
        proxy_cache_lock_age 1h;
        proxy_cache_lock_timeout 1h;
        proxy_ignore_headers Cache-Control Expires Set-Cookie;
        proxy_cache_valid 200 {TAG_FRESHNESS}s;
        location /v2/ {{ proxy_pass http://registry; }}
        location ~ ^/v2/.+/(blobs|manifests)/sha256: {{ proxy_pass http://registry; proxy_cache_valid 200 30d; }}
    }}""", "/v2/", P_NX)


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------

CURL_W = "%{http_code} %{size_download} %{speed_download} %{time_starttransfer} %{time_total}"


def curl_args(url, headers=()):
    a = ["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", CURL_W]
    for h in headers:
        a += ["-H", h]
    return a + [url]


def parse_curl(out, url, size):
    code, got, speed, ttfb, total = out.split()
    if code != "200" or int(got) != size:
        raise BenchError(f"GET {url}: status {code}, {got} bytes (want 200, {size})")
    return {"speed": float(speed), "ttfb": float(ttfb), "total": float(total)}


def blob_get(url, size, dump_headers=None):
    a = curl_args(url)
    if dump_headers:
        a[1:1] = ["-D", dump_headers]
    return parse_curl(run(a, timeout=600).stdout, url, size)


def x_cache(header_file):
    try:
        with open(header_file, errors="replace") as f:
            for line in f:
                if line.lower().startswith("x-cache:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "-"


def warm_blobs(targets, size):
    """targets: {name: (url, process tree root)}. Per target one untimed GET
    (warms the cache and the page cache), then WARM_PASSES rounds of one timed
    GET per target, interleaved so a busy moment hits all alike. Returns
    {name: (median MB/s, all MB/s, X-Cache of the last GET, CPU s/GB per process)}."""
    hf = {k: os.path.join(WORK, "logs", f"headers-{k}") for k in targets}
    for k, (url, _) in targets.items():
        blob_get(url, size, dump_headers=hf[k] + "-warmup")
    speeds = {k: [] for k in targets}
    cpu = {k: {} for k in targets}
    for _ in range(WARM_PASSES):
        for k, (url, root) in targets.items():
            c0 = cpu_snapshot(root)
            speeds[k].append(blob_get(url, size, dump_headers=hf[k])["speed"] / 1e6)
            for j, (_, t) in enumerate(cpu_delta(c0, cpu_snapshot(root))):
                cpu[k][j] = cpu[k].get(j, 0.0) + t
    gb = WARM_PASSES * size / 1e9
    return {k: (statistics.median(speeds[k]), speeds[k], x_cache(hf[k]), [cpu[k][j] / gb for j in sorted(cpu[k])])
            for k in targets}


def concurrent_cold(url, size):
    """COLD_CLIENTS GETs started together by one `curl --parallel` (no process
    spawn stagger between clients); each transfer's first byte is timed from
    its own start. Returns (results, errors)."""
    argv = ["curl", "-s", "--noproxy", "*", "-Z", "--parallel-max", str(COLD_CLIENTS), "--parallel-immediate",
            "-w", CURL_W + "\\n"]
    for _ in range(COLD_CLIENTS):
        argv += ["-o", "/dev/null", url]
    r = run(argv, timeout=600, check=False)
    res, errors = [], []
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if len(lines) != COLD_CLIENTS:
        errors.append(f"curl exit {r.returncode}, {len(lines)} of {COLD_CLIENTS} transfers reported")
    for ln in lines:
        try:
            res.append(parse_curl(ln, url, size))
        except (BenchError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    return res, errors


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_P99 = re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_REQS = re.compile(r"(\d+) requests in")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_ERR = re.compile(r"Socket errors:.*")


def wrk(url, headers=()):
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNS}", f"-d{WRK_SECONDS}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    out = run(argv + [url], timeout=WRK_SECONDS + 60).stdout
    rps = WRK_RPS.search(out)
    p99 = WRK_P99.search(out)
    if not rps or not p99:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    mult = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    non2xx = WRK_NON2XX.search(out)
    err = WRK_ERR.search(out)
    reqs = WRK_REQS.search(out)
    return {"rps": float(rps.group(1)), "requests": int(reqs.group(1)) if reqs else 0, "p99_ms": float(p99.group(1)) * mult,
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": err.group(0) if err else ""}


def manifest_check(url, digest):
    st, h, body = http_status(url, headers={"Accept": OCI_MANIFEST}, timeout=10)
    got = "sha256:" + hashlib.sha256(body).hexdigest()
    if st != 200 or got != digest:
        raise BenchError(f"GET {url}: status {st}, body digest {got} (want 200, {digest})")


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def compare_builds(spec):
    """{name: binary} of BENCH_COMPARE's "NAME=BINARY ..." (2 to 9 builds)."""
    builds = {}
    for word in spec.split():
        name, sep, binary = word.partition("=")
        if not sep or not name or not os.access(binary, os.X_OK):
            raise BenchError(f"BENCH_COMPARE: {word!r} is not NAME=EXECUTABLE")
        builds[name] = os.path.realpath(binary)
    if not 2 <= len(builds) <= 9:
        raise BenchError(f"BENCH_COMPARE: {len(builds)} builds; compare 2 to 9")
    return builds


def compare(builds):
    """regcache builds side by side on the two figures a change to the data
    path moves most: the warm blob GET (beside nginx static) and the cold
    pull of the big image (beside direct). Every GET and every pull of one
    round goes to each build in turn, so a busy moment of the machine hits
    all of them. Separate runs mislead: the same sendfile front's warm GET
    came out at 70-83 % of nginx in one session's full runs and 157-166 %
    in another's."""
    med = statistics.median
    setup_skopeo()
    n = len(builds)
    log(f"building test data: {PASSES * n + 1} images with a {BLOB_MIB} MiB layer")
    layout = Layout(os.path.join(WORK, "layout"))
    images = [layout.image(f"p{i + 1}", [BLOB_MIB * MIB, 200_000, 20_000]) for i in range(PASSES * n + 1)]
    up_root = os.path.join(WORK, "upstream-data")
    up = start_registry("upstream", P_UP, up_root)
    for im in images:
        push(layout, im["tag"], REPO)
    fill_memory()
    up_rc = start_registry("upstream-rc", P_UP_RC, up_root)
    ngx = start_nginx(layout, images[0])
    procs = {k: start_regcache(k, P_RC + i, binary=b) for i, (k, b) in enumerate(builds.items())}

    big, size = images[0]["layers"][0]
    log(f"warm blob GET ({size} bytes) x{WARM_PASSES} per target")
    targets = {"nginx": (f"http://127.0.0.1:{P_NGX}/v2/{REPO}/blobs/{big}", ngx.pid)}
    for i, k in enumerate(builds):
        targets[k] = (f"http://127.0.0.1:{P_RC + i}/v2/{RC_PREFIX}/{REPO}/blobs/{big}", procs[k].pid)
    warm = warm_blobs(targets, size)

    log(f"cold pulls of the {BLOB_MIB} MiB image, {PASSES} rounds")
    pull(f"127.0.0.1:{P_UP}/{REPO}:{images[0]['tag']}", "warmup")
    cold = {k: [] for k in ["direct", *builds]}
    cpu = {k: [] for k in cold}  # [skopeo, the cache's processes (if any), the upstream's] per pull
    fresh = iter(images[1:])
    for r in range(PASSES):
        order = ["direct", *builds]
        for k in order[r % len(order):] + order[:r % len(order)]:
            check_alive()
            if k == "direct":
                secs, c, _, _ = pull_cpu(f"127.0.0.1:{P_UP}/{REPO}:{images[0]['tag']}", "direct", up.pid)
            else:
                i = list(builds).index(k)
                secs, c, _, _ = pull_cpu(f"127.0.0.1:{P_RC + i}/{RC_PREFIX}/{REPO}:{next(fresh)['tag']}", k,
                                         up_rc.pid, procs[k].pid)
            cold[k].append(secs)
            cpu[k].append(c)
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in cold.items()))

    ng_mb, direct = warm["nginx"][0], med(cold["direct"])
    rows = [("measure", "nginx static / direct", *builds),
            (f"warm {BLOB_MIB} MiB blob GET, median of {WARM_PASSES}", fmt_mb(ng_mb),
             *(f"{fmt_mb(warm[k][0])} ({warm[k][0] / ng_mb:.0%})" for k in builds)),
            ("  same: CPU per GB served", f"{sum(warm['nginx'][3]):.2f} s",
             *(f"{sum(warm[k][3]):.2f} s" for k in builds)),
            (f"cold skopeo pull, {BLOB_MIB} MiB image, median of {PASSES}", f"{direct:.2f} s",
             *(f"{med(cold[k]):.2f} s ({med(cold[k]) / direct:.2f}x)" for k in builds)),
            ("  same: CPU s, skopeo + regcache (none direct) + the upstream", *(
                " + ".join(f"{med([c[j] for c in cpu[k]]):.2f}" for j in range(len(cpu[k][0])))
                for k in cold))]
    out = [*markdown_table(rows[0], rows[1:]), "", "details:"]
    out.append("  warm blob MB/s per GET: " + "; ".join(f"{k} " + ", ".join(f"{v:.0f}" for v in warm[k][1])
                                                     for k in targets))
    out.append("  cold pull seconds per round: " + "; ".join(f"{k} " + ", ".join(f"{v:.2f}" for v in cold[k])
                                                         for k in cold))
    out += [f"  {k}: {b}, code: {text_layout(b)}" for k, b in builds.items()]
    out.append(f"  memory: {CGROUP.why}")
    sys.stdout.write("\n".join(out) + "\n")


def main():
    global WORK, REGCACHE, PIDFILE, CGROUP
    WORK = os.environ["BENCH_WORK"]
    REGCACHE = os.environ.get("REGCACHE_BIN", "")
    PIDFILE = os.environ.get("BENCH_PIDFILE", os.path.join(WORK, "pids"))
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    CGROUP = MemoryCgroup(MEMORY_MIB, WORK)
    log(f"memory: {CGROUP.why}")
    if COMPARE:
        busy = [p for p in (P_UP, P_UP_RC, P_NGX, *range(P_RC, P_RC + 9)) if not port_free(p)]
        if busy:
            raise BenchError(f"ports already in use: {busy} (set BENCH_PORT_BASE)")
        return compare(compare_builds(COMPARE))

    ports = [P_UP, P_UP_RC, P_UP_R2, P_UP_NX, P_RC, P_R2, P_NX, P_NGX, P_RC_IDLE]
    if INDEX_BLOBS:
        ports += [P_RC_IDX, P_RC_NOUSE]
    if S3_SERVER:
        ports += [P_UP_S3, P_RC_S3, P_RC_S3B, P_S3]
    if TLS:
        ports += [P_UP_TLS, P_RC_TLS]
    if CLUSTER:
        ports += [P_UP_CL, P_RC_CL, P_RC_CL + 1, P_RC_CL + 2, PORT_BASE + 50, PORT_BASE + 51, PORT_BASE + 52]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise BenchError(f"ports already in use: {busy} (set BENCH_PORT_BASE)")

    cond = {"load_start": os.getloadavg(), "reported_start": reported_kib()}
    b0, t0 = cpu_busy_jiffies()
    time.sleep(1.0)
    b1, t1 = cpu_busy_jiffies()
    cond["idle_probe_busy"] = (b1 - b0) / max(1, t1 - t0)  # fraction of all cores, before we start anything
    busy_start, own_start = b1, own_cpu_seconds()
    clk = os.sysconf("SC_CLK_TCK")
    wall_start = time.monotonic()

    # --- data --------------------------------------------------------------
    setup_skopeo()
    log(f"building test data: {PASSES} images with a {BLOB_MIB} MiB layer, {PASSES} cold blobs of {COLD_MIB} MiB")
    layout = Layout(os.path.join(WORK, "layout"))
    images = [layout.image(f"p{i + 1}", [BLOB_MIB * MIB, 200_000, 20_000]) for i in range(PASSES)]
    colds = [layout.image(f"c{i + 1}", [COLD_MIB * MIB]) for i in range(PASSES)]
    smalls = {kind: [layout.index(f"{t}{i + 1}", [200_000]) if "index" in kind
                     else layout.image(f"{t}{i + 1}", [20_000] if "one layer" in kind else [200_000, 20_000])
                     for i in range(SMALL_PASSES)]
              for kind, _, _, t in SMALL_KINDS}

    up_root = os.path.join(WORK, "upstream-data")
    up = start_registry("upstream", P_UP, up_root)
    log("pushing to the upstream")
    for im in images:
        push(layout, im["tag"], REPO)
    for im in colds:
        push(layout, im["tag"], COLD_REPO)
    for kind, repo, _, _ in SMALL_KINDS:
        for im in smalls[kind]:
            push(layout, im["tag"], repo)
    for im in images:
        manifest_check(f"http://127.0.0.1:{P_UP}/v2/{REPO}/manifests/{im['tag']}", im["manifest"])
    fill_memory()
    # Each cache's own upstream front, whose CPU the cold GETs count.
    ups = {"regcache": start_registry("upstream-rc", P_UP_RC, up_root).pid,
           "registry2": start_registry("upstream-r2", P_UP_R2, up_root).pid,
           "nginx-cache": start_registry("upstream-nx", P_UP_NX, up_root).pid}

    # --- services -----------------------------------------------------------
    log("starting regcache, registry:2 proxy, nginx proxy_cache, nginx static")
    rc = start_regcache()
    r2 = start_registry("registry2-proxy", P_R2, os.path.join(WORK, "registry2-proxy", "data"),
                        proxy=f"http://127.0.0.1:{P_UP_R2}", access_log=True)
    nx = start_nginx_cache()
    ngx = start_nginx(layout, images[0])
    roots = {"nginx": ngx.pid, "regcache": rc.pid, "registry2": r2.pid, "nginx-cache": nx.pid}
    pss = PssPeaks(roots)

    caches = {
        "regcache": {"base": f"http://127.0.0.1:{P_RC}/v2/{RC_PREFIX}", "ref": f"127.0.0.1:{P_RC}/{RC_PREFIX}",
                     "up": "upstream-rc"},
        "registry2": {"base": f"http://127.0.0.1:{P_R2}/v2", "ref": f"127.0.0.1:{P_R2}", "up": "upstream-r2"},
        "nginx-cache": {"base": f"http://127.0.0.1:{P_NX}/v2", "ref": f"127.0.0.1:{P_NX}", "up": "upstream-nx"},
    }
    R = {"direct": {}, "nginx": {}, "regcache": {}, "registry2": {}, "nginx-cache": {}}
    for k in CACHES:
        R[k].update(cold=[], warm=[], warm_reqs=[], warm_desc="", fetches=[], heads=[], cold_reqs=[],
                    ttfb=[], cold_done=[], cold_errors=[], cold_cpu=[], cold_cpu_per=[], cold_pull_cpu=[], cold_pull_cpu_per=[], flow=[], small={kind: [] for kind, _, _, _ in SMALL_KINDS},
                    small_reqs={kind: [] for kind, _, _, _ in SMALL_KINDS})
    R["direct"]["pull"] = []
    R["direct"]["pull_cpu"] = []
    R["direct"]["flow"] = []
    R["direct"]["small"] = {kind: [] for kind, _, _, _ in SMALL_KINDS}
    rss_steps = [("started", tree_hwm_mib(rc.pid))]
    R["nginx"]["ttfb"] = []
    R["nginx"]["cold_done"] = []
    R["nginx"]["cold_cpu"] = []
    last_tag_fetch = {}

    # --- pulls: direct, cold and warm through each cache ----------------------
    log("warm-up: one untimed direct pull")
    pull(f"127.0.0.1:{P_UP}/{REPO}:{images[0]['tag']}", "warmup")
    for i, im in enumerate(images):
        tag = im["tag"]
        check_alive()
        # Who goes first turns with each pass, as for the small images below.
        order = ["direct", *caches]
        for k in order[i % len(order):] + order[:i % len(order)]:
            if k == "direct":
                secs, cpu, _, flow = pull_cpu(f"127.0.0.1:{P_UP}/{REPO}:{tag}", "direct", up.pid)
                R["direct"]["pull"].append(secs)
                R["direct"]["pull_cpu"].append(cpu)
                R["direct"]["flow"].append(flow.rates(im["layers"][0][1]))
                continue
            c = caches[k]
            n0 = len(settled_entries(c["up"]))
            secs, cpu, per, flow = pull_cpu(f"{c['ref']}/{REPO}:{tag}", f"{k}-cold", ups[k], roots[k])
            R[k]["flow"].append(flow.rates(im["layers"][0][1]))
            R[k]["cold"].append(secs)
            R[k]["cold_pull_cpu"].append(cpu)
            R[k]["cold_pull_cpu_per"].append(per)
            last_tag_fetch[(k, tag)] = time.monotonic()  # the tag was fetched before this
            n1 = len(settled_entries(c["up"]))
            R[k]["warm"].append(pull(f"{c['ref']}/{REPO}:{tag}", f"{k}-warm"))
            e = settled_entries(c["up"])
            R[k]["cold_reqs"].append(n1 - n0)
            R[k]["cold_desc"] = group_requests(e[n0:n1])
            R[k]["warm_reqs"].append(len(e) - n1)
            R[k]["warm_desc"] = describe_requests(e[n1:])
        log(f"pass {i + 1}: direct {R['direct']['pull'][-1]:.2f}s, "
            + ", ".join(f"{k} cold {R[k]['cold'][-1]:.2f}s warm {R[k]['warm'][-1]:.2f}s "
                        f"({R[k]['warm_reqs'][-1]} upstream req)" for k in caches))

    # --- cold pulls of small images: round trips, not bandwidth ---------------
    log("cold pulls of small images: " + ", ".join(kind for kind, _, _, _ in SMALL_KINDS))
    # Each cache has an upstream front of its own, so the count its log had
    # settled at after one pull is the count before its next.
    seen = {k: len(settled_entries(c["up"])) for k, c in caches.items()}
    for kind, repo, short, _ in SMALL_KINDS:
        for i, im in enumerate(smalls[kind]):
            check_alive()
            ref = f"{repo}:{im['tag']}"
            # Who goes first turns with each pass: a busy moment, or an
            # upstream file just read, favours no one.
            order = ["direct", *caches]
            for k in order[i % len(order):] + order[:i % len(order)]:
                if k == "direct":
                    R["direct"]["small"][kind].append(pull(f"127.0.0.1:{P_UP}/{ref}", "direct-small"))
                    continue
                c = caches[k]
                via = f"127.0.0.1:{P_RC}/{short}:{im['tag']}" if short and k == "regcache" else f"{c['ref']}/{ref}"
                R[k]["small"][kind].append(pull(via, f"{k}-small"))
                n = len(settled_entries(c["up"]))
                R[k]["small_reqs"][kind].append(n - seen[k])
                seen[k] = n

    cond["page_cost"] = page_cost(os.path.join(WORK, "page-cost"))
    rss_steps.append(("pulls", tree_hwm_mib(rc.pid)))

    # --- warm blob throughput -----------------------------------------------
    big, big_size = images[0]["layers"][0]
    log(f"warm blob GET ({big_size} bytes) x{WARM_PASSES}")
    targets = {"nginx": (f"http://127.0.0.1:{P_NGX}/v2/{REPO}/blobs/{big}", ngx.pid)}
    for k, c in caches.items():
        targets[k] = (f"{c['base']}/{REPO}/blobs/{big}", roots[k])
    for k, (med_, all_, xc, cpu) in warm_blobs(targets, big_size).items():
        R[k].update(blob=med_, blob_all=all_, blob_xcache=xc, blob_cpu=cpu)
    log("warm blob MB/s: " + ", ".join(f"{k} {R[k]['blob']:.0f}" for k in ("nginx", *caches)))

    rss_steps.append(("warm blob", tree_hwm_mib(rc.pid)))

    # --- manifest by digest under wrk ---------------------------------------
    mdig = images[0]["manifest"]
    urls = {"nginx": f"http://127.0.0.1:{P_NGX}/v2/{REPO}/manifests/{mdig}"}
    for k, c in caches.items():
        urls[k] = f"{c['base']}/{REPO}/manifests/{mdig}"
    for k, u in urls.items():
        manifest_check(u, mdig)
        R[k]["wrk"] = []
    log(f"manifest by digest: wrk -t{WRK_THREADS} -c{WRK_CONNS} -d{WRK_SECONDS}s x{PASSES} per target")
    for i in range(PASSES):  # interleaved, so a busy moment hits all alike
        for k, u in urls.items():
            check_alive()
            c0 = cpu_snapshot(roots[k])
            w = wrk(u, headers=[f"Accept: {OCI_MANIFEST}"])
            w["cpu"] = cpu_delta(c0, cpu_snapshot(roots[k]))
            R[k]["wrk"].append(w)
    for k in urls:
        R[k]["rps"] = statistics.median(w["rps"] for w in R[k]["wrk"])
        R[k]["p99"] = statistics.median(w["p99_ms"] for w in R[k]["wrk"])
        R[k]["non2xx"] = sum(w["non2xx"] for w in R[k]["wrk"])
        R[k]["sockerr"] = [w["socket_errors"] for w in R[k]["wrk"] if w["socket_errors"]]
        nreq = sum(w["requests"] for w in R[k]["wrk"])
        per = {}
        for w in R[k]["wrk"]:
            for j, (_, t) in enumerate(w["cpu"]):
                per[j] = per.get(j, 0.0) + t
        R[k]["wrk_cpu_us"] = [per[j] / max(1, nreq) * 1e6 for j in sorted(per)]
    log("manifest req/s: " + ", ".join(f"{k} {R[k]['rps']:.0f} (p99 {R[k]['p99']:.1f} ms)" for k in urls))

    rss_steps.append(("wrk", tree_hwm_mib(rc.pid)))

    # --- N concurrent cold GETs of one blob ---------------------------------
    log(f"{COLD_CLIENTS} concurrent cold GETs x{PASSES}")
    for i, cim in enumerate(colds):
        cdig, csize = cim["layers"][0]
        c0 = cpu_snapshot(ngx.pid)
        res, errs = concurrent_cold(f"http://127.0.0.1:{P_NGX}/v2/{REPO}/blobs/{big}", big_size)
        if errs:
            raise BenchError(f"nginx concurrent GETs failed: {errs[:3]}")
        R["nginx"]["ttfb"].append(max(r["ttfb"] for r in res))
        R["nginx"]["cold_done"].append(max(r["total"] for r in res))
        R["nginx"]["cold_cpu"].append(sum(t for _, t in cpu_delta(c0, cpu_snapshot(ngx.pid))))
        for k, c in caches.items():
            check_alive()
            n0 = len(settled_entries(c["up"]))
            c0, u0 = cpu_snapshot(roots[k]), cpu_snapshot(ups[k])
            res, errs = concurrent_cold(f"{c['base']}/{COLD_REPO}/blobs/{cdig}", csize)
            e = settled_entries(c["up"])[n0:]
            # The cache's processes as one sum (nginx's workers take turns),
            # then its upstream; regcache's supervisor and worker apart too.
            parts = [t for _, t in cpu_delta(c0, cpu_snapshot(roots[k]))]
            R[k]["cold_cpu"].append([sum(parts), sum(t for _, t in cpu_delta(u0, cpu_snapshot(ups[k])))])
            R[k]["cold_cpu_per"].append(parts)
            blob_path = f"/blobs/{cdig}"
            R[k]["fetches"].append(sum(1 for m, p, _ in e if m == "GET" and p.endswith(blob_path)))
            R[k]["heads"].append(sum(1 for m, p, _ in e if m == "HEAD" and p.endswith(blob_path)))
            R[k]["cold_errors"] += errs
            R[k]["ttfb"].append(max(r["ttfb"] for r in res) if res else float("nan"))
            R[k]["cold_done"].append(max(r["total"] for r in res) if res else float("nan"))
        log(f"pass {i + 1}: " + ", ".join(f"{k} {R[k]['fetches'][-1]} GET + {R[k]['heads'][-1]} HEAD upstream, "
                                           f"slowest first byte {R[k]['ttfb'][-1]:.3f}s" for k in caches))

    rss_steps.append((f"{COLD_CLIENTS} cold GETs", tree_hwm_mib(rc.pid)))

    # --- warm pull after the tag freshness window ---------------------------
    if AFTER_WINDOW:
        tag = images[0]["tag"]
        wait = last_tag_fetch[("regcache", tag)] + TAG_FRESHNESS + 1 - time.monotonic()
        if wait > 0:
            log(f"waiting {wait:.0f}s for regcache's {TAG_FRESHNESS}s tag freshness window to pass")
            time.sleep(min(wait, TAG_FRESHNESS + 2))
        for k, c in caches.items():
            n1 = len(settled_entries(c["up"]))
            R[k]["late_pull"] = pull(f"{c['ref']}/{REPO}:{tag}", f"{k}-late")
            e = settled_entries(c["up"])[n1:]
            R[k]["late_reqs"] = len(e)
            R[k]["late_desc"] = describe_requests(e)

    # --- peak RSS (before the S3 phase, which runs other processes) ---------
    check_alive()
    pids = tree_pids(rc.pid)
    R["regcache"]["rss_parts"] = [(pid, vm_hwm_kib(pid)) for pid in pids]
    R["regcache"]["rss"] = sum(v for _, v in R["regcache"]["rss_parts"]) / 1024
    R["regcache"]["rss_steps"] = rss_steps
    R["regcache"]["rss_now"] = [(pid, *status_kib(pid, "VmRSS", "RssAnon", "RssFile", "Threads")) for pid in pids]
    R["registry2"]["rss"] = sum(vm_hwm_kib(p) for p in tree_pids(r2.pid)) / 1024
    R["nginx"]["rss"] = sum(vm_hwm_kib(p) for p in tree_pids(ngx.pid)) / 1024
    R["nginx-cache"]["rss"] = sum(vm_hwm_kib(p) for p in tree_pids(nx.pid)) / 1024
    R["nginx"]["procs"] = len(tree_pids(ngx.pid))
    for k, v in pss.finish().items():
        R[k]["pss"] = v
    R["regcache"]["pss_parts"] = pss.parts.get("regcache", [])

    # --- start-up on a big store, bookkeeping on/off ----------------------------
    if INDEX_BLOBS:
        index_phase(R, images, rc.pid)

    # The phases below measure regcache processes of their own: alone, so
    # that no page they share with the main regcache is counted half.
    stop(rc)
    idle_phase(R)

    # --- an upstream over TLS ---------------------------------------------------
    if TLS:
        log("TLS phase: regcache in front of an upstream over TLS")
        tls_phase(images, R)

    # --- regcache on S3, and a cluster --------------------------------------------
    if S3_SERVER:
        R["s3_env"] = start_s3()
        log("S3 phase: regcache on s3s-fs, two nodes on one bucket")
        s3_phase(images, R)
    if CLUSTER:
        log("cluster phase: three replicas, one image pulled through all at once")
        cluster_phase(images, R, R.get("s3_env", {}))
    R.pop("s3_env", None)

    stop_all()
    b2, _ = cpu_busy_jiffies()
    wall = time.monotonic() - wall_start
    ours = own_cpu_seconds() - own_start
    others = (b2 - busy_start) / clk - ours
    cond.update(load_end=os.getloadavg(), wall=wall, others_cpu=max(0.0, others),
                ncpu=os.cpu_count(), ours_cpu=ours, reported_end=reported_kib())
    report(R, images, colds, cond)


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------


def markdown_table(head, rows, right=()):
    """Lines of a Markdown table, columns padded to their widest cell;
    the columns numbered in `right` (figures) right-aligned."""
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def fmt_mb(v):
    return f"{v:,.0f} MB/s"


def report(R, images, colds, cond):
    med = statistics.median
    ng, rc, r2, dr = R["nginx"], R["regcache"], R["registry2"], R["direct"]
    big_size = images[0]["layers"][0][1]
    direct = med(dr["pull"])
    rows = []  # measure, baseline, one cell per cache (CACHES), target, mark

    def mark(ok):
        return "PASS" if ok else "MISS"

    def per(cell):
        return tuple(cell(R[k]) for k in CACHES)

    def only_rc(cell):
        return (cell,) + ("-",) * (len(CACHES) - 1)

    rows.append((f"warm {BLOB_MIB} MiB blob GET (curl, 1 stream)", fmt_mb(ng["blob"]),
                 *per(lambda d: f"{fmt_mb(d['blob'])} ({d['blob'] / ng['blob']:.0%})"),
                 ">= 98 % of nginx", mark(rc["blob"] >= 0.98 * ng["blob"])))
    rows.append((f"manifest by digest, wrk -t{WRK_THREADS} -c{WRK_CONNS}: req/s", f"{ng['rps']:,.0f}",
                 *per(lambda d: f"{d['rps']:,.0f} ({d['rps'] / ng['rps']:.0%})"),
                 ">= 90 % of nginx", mark(rc["rps"] >= 0.9 * ng["rps"] and rc["non2xx"] == 0)))
    rows.append(("  same: p99 latency", f"{ng['p99']:.1f} ms", *per(lambda d: f"{d['p99']:.1f} ms"),
                 "<= nginx's", mark(rc["p99"] <= ng["p99"])))

    def fetches(d):
        s = f"{med(d['fetches']):g}"
        if len(set(d["fetches"])) > 1:
            s += f" ({'/'.join(str(x) for x in d['fetches'])})"
        if any(d["heads"]):
            s += f" (+{med(d['heads']):g} HEAD)"
        return s

    rows.append((f"{COLD_CLIENTS} clients GET one cold {COLD_MIB} MiB blob: upstream GETs", "-", *per(fetches),
                 "exactly 1", mark(all(f == 1 for f in rc["fetches"]) and not rc["cold_errors"])))
    ng_done = med(ng["cold_done"])
    rows.append(("  same: last client done, % of nginx static", f"{ng_done:.2f} s",
                 *per(lambda d: f"{med(d['cold_done']):.2f} s ({ng_done / med(d['cold_done']):.0%})"),
                 ">= 90 %", mark(ng_done / med(rc["cold_done"]) >= 0.9)))
    rows.append(("  same: slowest client's first byte", f"{med(ng['ttfb']):.3f} s",
                 *per(lambda d: f"{med(d['ttfb']):.3f} s"), "<= 0.05 s", mark(med(rc["ttfb"]) <= 0.05)))
    rows.append((f"cold skopeo pull, {BLOB_MIB} MiB image (direct = from upstream)", f"{direct:.2f} s",
                 *per(lambda d: f"{med(d['cold']):.2f} s ({med(d['cold']) / direct:.2f}x)"),
                 "<= 1.0x direct", mark(med(rc["cold"]) <= direct)))
    for kind, _, _, _ in SMALL_KINDS:
        dk = med(dr["small"][kind])
        rows.append((f"cold pull, {kind}", f"{dk:.3f} s",
                     *per(lambda d: f"{med(d['small'][kind]):.3f} s ({med(d['small'][kind]) / dk:.2f}x)"),
                     "<= 1.05x direct", mark(med(rc["small"][kind]) <= 1.05 * dk)))
    rows.append(("upstream requests per cold pull (big / small / index / library)", "-",
                 *per(lambda d: " / ".join(f"{med(x):g}" for x in [d["cold_reqs"], *d["small_reqs"].values()])),
                 "", ""))
    rows.append(("warm skopeo pull", f"{direct:.2f} s",
                 *per(lambda d: f"{med(d['warm']):.2f} s ({med(d['warm']) / direct:.2f}x)"), "", ""))
    rows.append((f"upstream requests per warm pull (tag < {TAG_FRESHNESS} s old)", "-",
                 *per(lambda d: f"{med(d['warm_reqs']):g}"), "", ""))
    if AFTER_WINDOW:
        rows.append((f"  same, tag > {TAG_FRESHNESS} s old", "-", *per(lambda d: f"{d['late_reqs']}"), "", ""))
    rows.append(("peak PSS (smaps_rollup, sampled 5/s, all processes)", f"{ng['pss']:.1f} MiB",
                 *per(lambda d: f"{d['pss']:.1f} MiB"), "<= 12 MiB", mark(rc["pss"] <= 12)))
    rows.append(("peak RSS (VmHWM, all processes)", f"{ng['rss']:.1f} MiB", *per(lambda d: f"{d['rss']:.1f} MiB"),
                 "<= 40 MiB", mark(rc["rss"] <= 40)))
    idle = R["idle"]
    rows.append(("idle PSS, embedded default CONFIG", "-",
                 *only_rc(f"{idle['pss']:.1f} MiB ({idle['procs']} processes)"), "<= 20 MiB",
                 mark(idle["pss"] <= 20)))

    if "tls" in R:
        T = R["tls"]
        tdirect = med(T["direct"])
        rows.append(("cold pull from an upstream over TLS (direct: over TLS too)", f"{tdirect:.2f} s",
                     *only_rc(f"{med(T['cold']):.2f} s ({med(T['cold']) / tdirect:.2f}x)"), "", ""))
        rows.append(("  same: peak PSS of that regcache", "-", *only_rc(f"{T['pss']:.1f} MiB"), "<= 12 MiB",
                     mark(T["pss"] <= 12)))

    if "s3" in R:
        s3 = R["s3"]
        rc_cold = med(rc["cold"])

        def vs(xs):
            return f"{med(xs):.2f} s ({med(xs) / direct:.2f}x direct, {med(xs) / rc_cold:.2f}x regcache disk)"

        rows.append(("regcache on S3 (s3s-fs): cold pull", f"{direct:.2f} s", *only_rc(vs(s3["cold"])), "", ""))
        rows.append(("  same: warm pull (local tier)", f"{direct:.2f} s", *only_rc(vs(s3["warm"])), "", ""))
        rows.append(("  same: 2nd node, empty disk, same bucket", f"{direct:.2f} s", *only_rc(vs(s3["node2"])),
                     "", ""))
        rows.append(("  2nd node: upstream requests per pull", "-", *only_rc(f"{med(s3['node2_reqs']):g}"),
                     "no blob GETs", mark(s3["node2_blob_gets"] == 0)))

    if "index" in R:
        X = R["index"]
        built = "-" if X["index_built"] is None else f"{X['index_built']:.2f} s"
        rows.append((f"start-up (to /v2/ 200) with {INDEX_BLOBS:,} blobs stored", f"{X['empty_start']:.3f} s empty",
                     *only_rc(f"{X['start']:.3f} s ({X['start'] / X['empty_start']:.2f}x empty)"), "<= 1 s",
                     mark(X["start"] <= 1.0)))
        rows.append(("  same: background index built", "-", *only_rc(f"{built} (scan {X['scan_ms']} ms)"), "", ""))
        rows.append(("last-use bookkeeping: manifest req/s on vs off", f"{X['rps_off']:,.0f} off",
                     *only_rc(f"{X['rps_on']:,.0f} on ({X['rps_on'] / X['rps_off']:.0%})"), "", ""))
        rows.append(("  same: warm blob GET on vs off", fmt_mb(X["blob_off"]) + " off",
                     *only_rc(f"{fmt_mb(X['blob_on'])} on ({X['blob_on'] / X['blob_off']:.0%})"), "", ""))

    if "cluster" in R:
        C = R["cluster"]
        rc_cold = med(rc["cold"])
        rows.append(("cluster of 3, one image through all at once: upstream bytes / image", "-",
                     *only_rc(f"{med(C['ratio']):.2f}"), "1.0", mark(all(abs(r - 1.0) < 0.01 for r in C["ratio"]))))
        rows.append(("  same: slowest of the 3 pulls vs one cold pull", f"{rc_cold:.2f} s one",
                     *only_rc(f"{med(C['pull']):.2f} s ({med(C['pull']) / rc_cold:.2f}x)"), "", ""))

    head = ("measure", "nginx static / direct", "regcache", "registry:2 proxy", "nginx proxy_cache",
            "regcache target", "")
    out = []
    out.append("")
    out.append(f"regcache benchmark: {BLOB_MIB} MiB blob, {COLD_MIB} MiB cold blob, medians of {PASSES} passes "
               f"({SMALL_PASSES} for small pulls), wrk {WRK_SECONDS} s, tag freshness {TAG_FRESHNESS} s")
    out += markdown_table(head, rows, right=range(1, len(CACHES) + 2))
    out.append("")
    out.append("details:")
    out.append(f"  warm blob MB/s per pass: " + "; ".join(
        f"{k} {', '.join(f'{x:.0f}' for x in R[k]['blob_all'])}" for k in ("nginx", *CACHES))
        + f"; regcache X-Cache {rc['blob_xcache']}")
    out.append(f"  manifest req/s per pass: " + "; ".join(
        f"{k} {', '.join(format(w['rps'], '.0f') for w in R[k]['wrk'])}" for k in ("nginx", *CACHES)))
    for k in ("nginx", *CACHES):
        if R[k]["non2xx"] or R[k]["sockerr"]:
            out.append(f"  wrk {k}: {R[k]['non2xx']} non-2xx responses; {'; '.join(R[k]['sockerr'])}")
    out.append(f"  slowest first byte per pass: " + "; ".join(
        f"{k} {', '.join(f'{x:.3f}' for x in R[k]['ttfb'])}" for k in ("nginx", *CACHES)))
    def cpu_parts(v, unit):
        return " + ".join(f"{x:.2f}" if unit == "s/GB" else f"{x:.0f}" for x in v) + f" {unit}"

    coarse = " (coarse: 10 ms ticks over little data)" if WARM_PASSES * big_size < 500e6 else ""
    out.append(f"  CPU per warm blob GB served{coarse} (per process, regcache: supervisor + worker): "
               + "; ".join(f"{k} {cpu_parts(R[k]['blob_cpu'], 's/GB')}"
                           for k in ("nginx", *CACHES)))
    out.append("  CPU per manifest request under wrk: "
               + "; ".join(f"{k} {cpu_parts(R[k]['wrk_cpu_us'], 'us')}" for k in ("nginx", *CACHES)))
    out.append(f"  {COLD_CLIENTS} cold GETs, last client done (s) per pass: " + "; ".join(
        f"{k} {', '.join(f'{x:.2f}' for x in R[k]['cold_done'])}" for k in ("nginx", *CACHES)))

    def median_parts(passes):
        return [statistics.median(p[j] for p in passes) for j in range(min(map(len, passes)))]

    def parts(passes):
        return " + ".join(f"{x:.2f}" for x in median_parts(passes))
    # regcache's processes keep their order (supervisor, worker); nginx's
    # workers take turns, so only the cache's sum is a median for every cache.
    out.append(f"  CPU s of the {COLD_CLIENTS} cold GETs, median pass (the cache's processes + its upstream; "
               f"nginx static's wall time is {os.cpu_count() * med(ng['cold_done']):.2f} core-s): "
               f"nginx {med(ng['cold_cpu']):.2f}; " + "; ".join(
                   f"{k} {parts(R[k]['cold_cpu'])}" for k in CACHES)
               + f"; regcache's supervisor + worker {parts(rc['cold_cpu_per'])}")
    out.append(f"  CPU s of a cold pull of the {BLOB_MIB} MiB image, median pass (skopeo + the cache's processes + "
               f"the upstream's): direct {parts(dr['pull_cpu'])}; " + "; ".join(
                   f"{k} {parts(R[k]['cold_pull_cpu'])}" for k in CACHES)
               + f"; regcache's supervisor + worker {parts(rc['cold_pull_cpu_per'])}")
    def flow_parts(rates):
        got = [r for r in rates if r]
        if not got:
            return "-"
        afters = [r[1] for r in got if r[1] is not None]
        return (f"{statistics.median(r[0] for r in got):.0f}"
                + (f" / {statistics.median(afters):.0f}" if afters else "")
                + f" (upstream done at {statistics.median(r[2] for r in got):.2f} s)")
    out.append(f"  skopeo's MB/s in a cold pull of the {BLOB_MIB} MiB image while the upstream still sent the blob"
               f" / after it had (median pass; on 2 cores a fill's CPU is taken from the client while it runs): "
               f"direct {flow_parts(dr['flow'])}; " + "; ".join(f"{k} {flow_parts(R[k]['flow'])}" for k in CACHES))
    out.append(f"  new page-cache pages here: {BLOB_MIB} MiB written into each of "
               f"{len(cond['page_cost'])} new files in a row after the pulls took "
               f"{', '.join(f'{x:.2f}' for x in cond['page_cost'])} CPU-s (with no memory limit the first may reuse memory "
               "just freed, later ones land in memory not used lately); a cold pull through a cache writes the blob into new "
               "pages twice (the cache's copy, skopeo's), a direct pull once")
    for k in CACHES:
        if R[k]["cold_errors"]:
            out.append(f"  {k} concurrent cold GET failures: {len(R[k]['cold_errors'])}: {R[k]['cold_errors'][0]}")
    out.append(f"  pull seconds per pass: direct {', '.join(f'{x:.2f}' for x in dr['pull'])}; " + "; ".join(
        f"{k} cold {', '.join(f'{x:.2f}' for x in R[k]['cold'])} warm {', '.join(f'{x:.2f}' for x in R[k]['warm'])}"
        for k in CACHES))
    out.append("  upstream requests per cold pull of the big image: "
               + "; ".join(f"{k} {', '.join(map(str, R[k]['cold_reqs']))}" for k in CACHES))
    for kind, _, _, _ in SMALL_KINDS:
        out.append(f"  cold pull seconds per pass, {kind}: direct {', '.join(f'{x:.3f}' for x in dr['small'][kind])}; "
                   + "; ".join(f"{k} {', '.join(f'{x:.3f}' for x in R[k]['small'][kind])} "
                               f"({', '.join(map(str, R[k]['small_reqs'][kind]))} upstream req)" for k in CACHES))
    for k in CACHES:
        out.append(f"  {k} upstream requests in the last cold pull: {R[k]['cold_desc']}")
    out.append("  warm pull upstream requests: " + "; ".join(f"{k} {R[k]['warm_desc']}" for k in CACHES))
    if AFTER_WINDOW:
        out.append("  warm pull after the window: " + "; ".join(f"{k} {R[k]['late_desc']}" for k in CACHES))
    if "index" in R:
        X = R["index"]
        out.append(f"  index phase: {X.get('indexed_blobs')} blobs indexed, VmHWM {X['rss']:.1f} MiB with them; "
                   f"manifest req/s per pass: on {', '.join(f'{x:.0f}' for x in X['rps_all']['on'])}, "
                   f"off {', '.join(f'{x:.0f}' for x in X['rps_all']['off'])}")
    if "cluster" in R:
        C = R["cluster"]
        out.append(f"  cluster: slowest pull per pass {', '.join(f'{x:.2f}' for x in C['pull'])} s; upstream blob "
                   f"GETs per pass {', '.join(map(str, C['gets']))}; upstream bytes / image "
                   f"{', '.join(f'{x:.2f}' for x in C['ratio'])}")
    if "tls" in R:
        T = R["tls"]
        out.append(f"  TLS upstream pull seconds per pass: direct {', '.join(f'{x:.2f}' for x in T['direct'])}; "
                   f"regcache cold {', '.join(f'{x:.2f}' for x in T['cold'])}")
    if "s3" in R:
        s3 = R["s3"]
        out.append(f"  S3 pull seconds per pass: cold {', '.join(f'{x:.2f}' for x in s3['cold'])}; "
                   f"warm {', '.join(f'{x:.2f}' for x in s3['warm'])}; "
                   f"node 2 {', '.join(f'{x:.2f}' for x in s3['node2'])}; upstream requests: cold "
                   f"{', '.join(map(str, s3['cold_reqs']))}, node 2 {', '.join(map(str, s3['node2_reqs']))} "
                   f"({s3['node2_desc']}); {s3['objects']} objects in the bucket")
    parts = ", ".join(f"pid {p} {kib / 1024:.1f}" for p, kib in rc["rss_parts"])
    out.append(f"  regcache VmHWM MiB: {parts} (supervisor first; {len(rc['rss_parts']) - 1} worker(s)); "
               f"nginx {ng['procs']} processes")
    out.append("  regcache at the end (MiB): " + "; ".join(
        f"pid {p} VmRSS {a / 1024:.1f} (anon {b / 1024:.1f}, file {c / 1024:.1f}), {t} threads"
        for p, a, b, c, t in rc["rss_now"]))
    peaks = [("main run", rc)] + ([("TLS phase", R["tls"])] if "tls" in R else [])
    out.append("  regcache at its peak PSS, anon + file MiB per process (supervisor first; file is mostly "
               "code): " + "; ".join(f"{name} {d['pss']:.1f} = " + ", ".join(
                   f"{a:.1f} + {f:.1f}" for a, f in d.get("pss_parts", [])) for name, d in peaks))
    out.append("  regcache VmHWM sum (MiB) after each phase: "
               + ", ".join(f"{name} {v:.1f}" for name, v in rc["rss_steps"]))
    out.append("  regcache code: " + text_layout(REGCACHE))
    busy = cond["others_cpu"] / (cond["wall"] * cond["ncpu"])
    out.append(f"  machine: {cond['ncpu']} cores; load avg {cond['load_start'][0]:.2f} at start, "
               f"{cond['load_end'][0]:.2f} at end; CPU busy before start {cond['idle_probe_busy']:.0%}; "
               f"other processes used ~{cond['others_cpu']:.0f} CPU-s during the {cond['wall']:.0f} s run "
               f"(~{busy:.0%} of the machine){' -> MACHINE WAS BUSY, figures are noisy' if busy > 0.1 else ''}")
    out.append(f"  memory: {CGROUP.why}")
    if cond["reported_start"] is not None and cond["reported_end"] is not None:
        out.append(f"  free memory this VM handed back to its host during the run (free page reporting; written "
                   f"again, it costs what the new-pages line shows): "
                   f"{(cond['reported_end'] - cond['reported_start']) / MIB:.1f} GiB")
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    res = os.environ.get("BENCH_RESULTS")
    if res:
        with open(res, "w") as f:
            f.write(text)
        with open(res + ".json", "w") as f:
            json.dump({"results": R, "conditions": cond}, f, indent=1, default=str)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        main()
    except BenchError as e:
        log(f"FAILED: {e}")
        code = 1
    finally:
        stop_all()
        if CGROUP is not None:
            CGROUP.leave()
    sys.exit(code)
