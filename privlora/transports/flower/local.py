"""Run a privlora config on a real Flower deployment on this machine, or on Flower's simulation
engine, and end every process it started.

    python -m privlora.transports.flower.local CONFIG --out DIR [--nodes N] [--tls CERTDIR] [--resume]
    python -m privlora.transports.flower.local CONFIG --out DIR --simulation [--nodes N]

Deployment: one ``flower-superlink`` and N ``flower-supernode`` processes on 127.0.0.1 (free
ports), each node with its own node config (``client-id``, ``node-dir``, ``data = "partition"``
of the config's data, its signing key when the config pins a registry); then ``flwr run`` of
the app in ``examples/flower`` (or ``--app``), waiting for the run to finish. Every process is
ended by its id, descendants included (SuperLink and SuperNode start ``flower-superexec``, which
starts ``flwr-serverapp``/``flwr-clientapp``); this process becomes their "subreaper" so that no
orphan is left behind.

`LocalDeployment` is the same as a context manager, for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_APP = ROOT / "examples" / "flower"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree(pid: int, sig: int = signal.SIGTERM, grace: float = 5.0) -> list[int]:
    """Send ``sig`` to ``pid`` and every descendant; SIGKILL whatever is left after ``grace``."""
    pids = descendants(pid) + [pid]
    for s in (sig, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, s)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_alive(p) for p in pids):
            reap()
            time.sleep(0.1)
        reap()
        if not any(_alive(p) for p in pids) or s == signal.SIGKILL:
            break
    return pids


def become_subreaper() -> None:
    """Orphans of our children (flower-superexec runs in its own session) come back to us."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed; run `python3 dev.py setup` (it installs flwr)")
    return found


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def config_arg(values: dict) -> str:
    """A dict as Flower's ``--node-config``/``--run-config`` string (space-separated TOML pairs)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1. ``nodes``: one node config (dict) per node;
    ``tls``: a folder with ``ca.crt``, ``server.pem`` and ``server.key`` (see the README's
    certificate command), or None for ``--insecure``."""

    def __init__(self, nodes: list[dict], workdir: str | Path, tls: str | Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.tls = None if tls is None else Path(tls)
        self.node_configs = list(nodes)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                        FLWR_HOME=str(self.home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        connection = (f'root-certificates = "{self.tls / "ca.crt"}"\n' if self.tls else "insecure = true\n")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n{connection}',
            encoding="utf-8")

    # ---------------------------------------------------------------- processes
    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.workdir)
        log.close()
        self.procs[name] = proc
        return proc

    def __enter__(self) -> "LocalDeployment":
        become_subreaper()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, wait: float = 60.0) -> None:
        sec = (["--ssl-ca-certfile", str(self.tls / "ca.crt"), "--ssl-certfile", str(self.tls / "server.pem"),
                "--ssl-keyfile", str(self.tls / "server.key")] if self.tls else ["--insecure"])
        self._start("superlink", [_bin("flower-superlink"), *sec, "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        self._wait_healthy(wait)
        for i, nc in enumerate(self.node_configs):
            self.start_node(i, nc)

    def start_node(self, i: int, node_config: dict) -> None:
        sec = ["--root-certificates", str(self.tls / "ca.crt")] if self.tls else ["--insecure"]
        self._start(f"supernode{i}", [_bin("flower-supernode"), *sec, "--superlink", f"127.0.0.1:{self.port}",
                                      "--host", "127.0.0.1", "--port", str(free_port()),
                                      "--node-config", config_arg(node_config), "--max-wait-time", "60"])

    def _wait_healthy(self, wait: float) -> None:
        import httpx

        scheme = "https" if self.tls else "http"
        verify = str(self.tls / "ca.crt") if self.tls else True
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.workdir / 'superlink.log'}")
            try:
                if httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", timeout=1.0, verify=verify).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink was not healthy within {wait:.0f} s; see {self.workdir / 'superlink.log'}")

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> list[int]:
        """Kill SuperNode ``i`` and everything it started (SIGKILL by default: a crash)."""
        return kill_tree(self.procs[f"supernode{i}"].pid, sig, grace=2.0)

    def close(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            kill_tree(proc.pid)
        for pid in descendants(os.getpid()):  # anything orphaned that came back to us
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        reap()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    # ---------------------------------------------------------------- runs
    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=self.workdir)

    def submit(self, run_config: dict, app: str | Path = DEFAULT_APP) -> int:
        res = self._flwr("run", str(app), "local", "--run-config", config_arg(run_config), "--format", "json")
        try:
            return int(json.loads(res.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr run failed ({res.returncode}): {res.stdout[-1500:]} {res.stderr[-1500:]}") from None

    def status(self, run_id: int) -> str:
        res = self._flwr("ls", "local", "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(res.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "unknown"

    def wait(self, run_id: int, timeout: float, on_poll=None) -> str:
        """The run's final status ("finished:completed", "finished:failed", ...) or "timeout"."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if on_poll is not None:
                on_poll()
            st = self.status(run_id)
            if st.startswith("finished"):
                return st
            time.sleep(1.0)
        self._flwr("stop", str(run_id), "local")
        return "timeout"

    def stop(self, run_id: int) -> None:
        self._flwr("stop", str(run_id), "local")

    def logs(self, run_id: int) -> str:
        res = self._flwr("log", str(run_id), "local", "--show")
        return res.stdout + res.stderr


def node_configs(cfg_path: str | Path, n: int, root: str | Path, noise: str = "secure", key_dir: str | Path | None = None) -> list[dict]:
    """One node config per client 0..n-1: its share of the config's data, its own folder, its key."""
    out = []
    for k in range(n):
        nc = {"config": str(Path(cfg_path).resolve()), "client-id": k, "data": "partition",
              "node-dir": str(Path(root).resolve() / f"client-{k}"), "noise": noise}
        if key_dir is not None:
            nc["signing-key"] = str(Path(key_dir).resolve() / f"client-{k}.key")
        out.append(nc)
    return out


def run_simulation_engine(cfg_path: str | Path, out: str | Path, num_nodes: int | None = None, node_root: str | Path | None = None,
                          key_dir: str | Path | None = None, cpus: int = 1) -> None:
    """The same ServerApp and ClientApp on Flower's simulation engine (Ray), ``num_nodes`` virtual
    nodes (default data.num_clients), each the client whose id is its partition id."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from privlora.core.config import load_config
    from privlora.transports.flower import client_app, server_app

    cfg = load_config(cfg_path)
    n = num_nodes or cfg.data.num_clients
    settings = {"config": str(Path(cfg_path).resolve()), "out": str(Path(out).resolve()),
                "node-root": str(Path(node_root or Path(out).resolve().parent / f"{Path(out).name}-nodes").resolve()),
                "noise": "seeded", "wait": 300.0}
    if key_dir is not None:
        settings["key-dir"] = str(Path(key_dir).resolve())
    sapp = ServerApp()

    @sapp.main()
    def _main(grid, context: Context) -> None:
        server_app.run_server(grid, settings)

    capp = ClientApp()

    @capp.query("privlora")
    def _handle(msg, context: Context):
        return client_app.handle(msg, context, run_config=settings)

    run_simulation(server_app=sapp, client_app=capp, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "logging_level": "WARNING", "include_dashboard": False}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m privlora.transports.flower.local", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--nodes", type=int, default=0, help="number of nodes (default data.num_clients)")
    ap.add_argument("--simulation", action="store_true", help="Flower's simulation engine instead of real processes")
    ap.add_argument("--tls", default=None, help="folder with ca.crt, server.pem, server.key")
    ap.add_argument("--keys", default=None, help="folder of `privlora keys simulation` (the config's secagg.key_registry and every client-K.key: a test deployment on one machine only)")
    ap.add_argument("--noise", default="secure", choices=("secure", "seeded"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    from privlora.core.config import load_config

    cfg = load_config(args.config)
    n = args.nodes or cfg.data.num_clients
    out = Path(args.out).resolve()
    if args.simulation:
        run_simulation_engine(args.config, out, n, key_dir=args.keys)
        return 0
    work = out.parent / f"{out.name}-flower"
    nodes = node_configs(args.config, n, work / "nodes", args.noise, args.keys)
    with LocalDeployment(nodes, work, tls=args.tls) as dep:
        run_id = dep.submit({"config": str(Path(args.config).resolve()), "out": str(out), "resume": args.resume,
                             "overwrite": args.overwrite})
        print(f"privlora: Flower run {run_id} started; logs in {work}", file=sys.stderr)
        status = dep.wait(run_id, args.timeout)
        (work / f"run-{run_id}.log").write_text(dep.logs(run_id), encoding="utf-8")
        print(f"privlora: Flower run {run_id}: {status}", file=sys.stderr)
        return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
