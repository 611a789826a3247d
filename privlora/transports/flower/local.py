"""Run a privlora config on a real Flower deployment on this machine, or on Flower's simulation
engine, and end every process it started.

    python -m privlora.transports.flower.local [CONFIG] --out DIR [--set KEY=VALUE ...] [--tls CERTDIR] [--keys DIR]
    python -m privlora.transports.flower.local [CONFIG] --out DIR --simulation [--noise secure|seeded]
    python -m privlora.transports.flower.local --resume DIR

Deployment: one ``flower-superlink`` on 127.0.0.1 (a free port) and, per node, one node process
(``privlora node serve``, `privlora.federation.node_process`: its own node config with
``client-id``, ``node-dir``, ``data = "partition"`` of the config's data, its signing key when
the config pins a registry; the model loaded once) and one ``flower-supernode`` whose ClientApp
only relays to the node process's socket (node config ``node-socket``, ``client-id``); then
``flwr run`` of the app in ``examples/flower`` (or ``--app``), waiting for the run to finish.
Every process is ended by its id, descendants included (SuperLink and SuperNode start
``flower-superexec``, which starts ``flwr-serverapp``/``flwr-clientapp``; a node process gets
SIGTERM and finishes the message in hand); this process becomes their "subreaper" so that no
orphan is left behind.

Everything a user can get wrong is checked before any process starts (the config and every
``--set``, ``--nodes`` against ``data.num_clients``, the output folder, the TLS and key folders,
Flower's commands): one line ``privlora: error: ...``, exit 2. Each process runs in its own
process group (a Ctrl-C in the terminal reaches the launcher only), and on every exit -- the run
finished or failed, ``--timeout``, an error, Ctrl-C (exit 130), SIGTERM or SIGHUP (exit 143 / 129)
-- the launcher ends each group it started and every descendant, by id, before it returns. A
summary ends a finished run: rounds, held-out accuracy, max epsilon, the folder.

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
    """Send ``sig`` to ``pid``, its process group when it leads one, and every descendant; SIGKILL
    whatever is left after ``grace``."""
    pids = descendants(pid) + [pid]
    try:
        group = os.getpgid(pid) if os.getpgid(pid) == pid else None
    except ProcessLookupError:
        group = None
    for s in (sig, signal.SIGKILL):
        if group is not None:
            try:
                os.killpg(group, s)
            except (ProcessLookupError, PermissionError):
                pass
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
    ``tls``: a folder with ``ca.crt``, ``server.pem`` and ``server.key`` (see docs/flower.md's
    certificate command), or None for ``--insecure``. ``node_processes`` (default): each node
    config goes to a node process (``privlora node serve``) and its SuperNode's ClientApp relays
    to it; False: the ClientApp is the node (a fresh process per message)."""

    def __init__(self, nodes: list[dict], workdir: str | Path, tls: str | Path | None = None, node_processes: bool = True):
        self.node_processes = bool(node_processes)
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
                                cwd=self.workdir, start_new_session=True)  # its own group: a terminal's Ctrl-C reaches us only
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
        if self.node_processes:
            for i, nc in enumerate(self.node_configs):
                self.start_node_process(i, nc)
            for i in range(len(self.node_configs)):
                self.wait_node_process(i, max(wait, 600.0))  # each loads its data and model before it listens
        for i, nc in enumerate(self.node_configs):
            self.start_node(i, nc)

    def node_socket(self, i: int) -> Path:
        from privlora.federation.deploy import node_settings
        from privlora.federation.node_process import socket_path

        return socket_path(node_settings(self.node_configs[i]))

    def start_node_process(self, i: int, node_config: dict) -> subprocess.Popen:
        """Node ``i``'s node process (``privlora node serve``), its config written to ``workdir/node-i.toml``."""
        path = self.workdir / f"node-{i}.toml"
        path.write_text("".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n" for k, v in node_config.items()), encoding="utf-8")
        return self._start(f"node{i}", [sys.executable, "-m", "privlora", "node", "serve", "--node-config", str(path)])

    def wait_node_process(self, i: int, wait: float = 120.0) -> None:
        """Until node ``i``'s process listens (its socket exists), bounded by ``wait`` seconds."""
        from privlora.federation.node_process import listening

        sock, proc = self.node_socket(i), self.procs[f"node{i}"]
        end = time.monotonic() + wait
        while not listening(sock):
            if proc.poll() is not None:
                log = (self.workdir / f"node{i}.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"node process {i} exited ({proc.returncode}) before listening: {log}")
            if time.monotonic() > end:
                raise TimeoutError(f"node process {i} did not listen on {sock} within {wait:.0f} s; see {self.workdir / f'node{i}.log'}")
            time.sleep(0.1)

    def relay_config(self, i: int) -> dict:
        """What SuperNode ``i``'s ClientApp gets: where to relay, and its client id (nothing else)."""
        return {"node-socket": str(self.node_socket(i)), "client-id": int(self.node_configs[i].get("client-id", i))}

    def start_node(self, i: int, node_config: dict) -> None:
        if self.node_processes:
            node_config = self.relay_config(i)
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
        """Kill SuperNode ``i``, its node process and everything they started (SIGKILL by default: a crash)."""
        pids = kill_tree(self.procs[f"supernode{i}"].pid, sig, grace=2.0)
        if f"node{i}" in self.procs:
            pids += kill_tree(self.procs[f"node{i}"].pid, sig, grace=2.0)
        return pids

    def close(self) -> None:
        """End every process started here, its group and its descendants; a second Ctrl-C or
        SIGTERM meanwhile waits until this is done (signals blocked)."""
        stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            for name, proc in reversed(list(self.procs.items())):
                kill_tree(proc.pid)
            for pid in descendants(os.getpid()):  # anything orphaned that came back to us
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
            reap()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

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


def simulation_settings(cfg_path: str | Path, out: str | Path, node_root: str | Path | None = None,
                        key_dir: str | Path | None = None, noise: str = "secure") -> dict:
    """The run config the simulation engine's ServerApp and virtual ClientApps share. Its
    ``noise`` is what every virtual node draws DP noise from (`client_app._node_config` reads
    it), so ``--noise`` means the same under ``--simulation`` as on real SuperNodes."""
    settings = {"config": str(Path(cfg_path).resolve()), "out": str(Path(out).resolve()),
                "node-root": str(Path(node_root or Path(out).resolve().parent / f"{Path(out).name}-nodes").resolve()),
                "noise": noise, "wait": 300.0}
    if key_dir is not None:
        settings["key-dir"] = str(Path(key_dir).resolve())
    return settings


def run_simulation_engine(cfg_path: str | Path, out: str | Path, num_nodes: int | None = None, node_root: str | Path | None = None,
                          key_dir: str | Path | None = None, cpus: int = 1, noise: str = "secure") -> None:
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
    settings = simulation_settings(cfg_path, out, node_root, key_dir, noise)
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


# ------------------------------------------------------------------------------------------ CLI
PATH_FIELDS = (("model", "path"), ("data", "source"), ("secagg", "key_registry"))
"""Config fields holding a file or folder; a resolved config written elsewhere makes them absolute."""


class Terminated(Exception):
    """SIGTERM or SIGHUP reached the launcher: end every process it started, then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def _say(text: str) -> None:
    print(f"privlora: {text}", file=sys.stderr, flush=True)


def _resolved_config_file(cfg, source: Path | None, work: Path) -> Path:
    """``cfg`` (with its ``--set``s) as a TOML file every node can read: ``work/config.toml``,
    with relative paths made absolute against the config file's folder (the current folder for
    the embedded default)."""
    import dataclasses

    from privlora.core.config import config_to_toml

    base = source.resolve().parent if source is not None else Path.cwd()
    for section, key in PATH_FIELDS:
        sec = getattr(cfg, section)
        value = getattr(sec, key, "")
        if value and not str(value).startswith("embedded:") and not Path(value).is_absolute():
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sec, **{key: str(base / value)})})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.toml"
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    return path


def validate_launch(args: argparse.Namespace):
    """Everything checked before any process starts: (config, its file for the nodes or None to
    write the resolved one, number of nodes). Raises `UserError` (one line, exit 2)."""
    from privlora.core.config import ConfigError, load_config
    from privlora.core.errors import UserError
    from privlora.core.overrides import load_with_overrides
    from privlora.federation.preflight import check_out_dir, check_resume_folder

    if args.resume:
        if args.set or args.config or args.out or args.overwrite:
            raise ConfigError("--resume DIR continues the run in DIR with its own config.toml; give no CONFIG, --out, "
                              "--set or --overwrite")
        check_resume_folder(Path(args.resume))
        source = Path(args.resume) / "config.toml"
        cfg = load_config(source)
    else:
        if not args.out:
            raise ConfigError("--out DIR is required: the folder the run writes (as for privlora run); "
                              "or --resume DIR to continue a run")
        cfg = load_with_overrides(args.config, args.set)
        source = Path(args.config) if args.config else None
        check_out_dir(Path(args.out), overwrite=args.overwrite)
    n = args.nodes or cfg.data.num_clients
    if n != cfg.data.num_clients:
        raise ConfigError(
            f"--nodes {n} but data.num_clients = {cfg.data.num_clients}: every client is one node and the server waits "
            f"for all {cfg.data.num_clients}; drop --nodes, or add --set data.num_clients={n}")
    if args.tls is not None:
        missing = [f for f in ("ca.crt", "server.pem", "server.key") if not (Path(args.tls) / f).is_file()]
        if args.simulation:
            raise ConfigError("--tls is for real SuperNodes; the simulation engine has no network to protect: drop --tls "
                              "or --simulation")
        if missing:
            raise UserError(f"--tls {args.tls}: missing {', '.join(missing)}; make them with the openssl commands of "
                            "docs/flower.md")
    if args.keys is not None:
        missing = [f"client-{k}.key" for k in range(n) if not (Path(args.keys) / f"client-{k}.key").is_file()]
        if missing:
            raise UserError(f"--keys {args.keys}: missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                            f"write them with `privlora keys simulation --clients {n} --out {args.keys}`")
    if args.simulation:
        try:
            import flwr.simulation  # noqa: F401
        except ImportError as exc:
            raise UserError(f"--simulation needs flwr[simulation] ({exc}); run `python3 dev.py setup` or "
                            "`pip install -e '.[flower]'`") from None
    else:
        for name in ("flower-superlink", "flower-supernode", "flwr", "flower-superexec"):
            try:
                _bin(name)
            except FileNotFoundError as exc:
                raise UserError(f"{exc}; or pip install -e '.[flower]'") from None
    if args.timeout <= 0:
        raise ConfigError(f"--timeout: must be a positive number of seconds, found {args.timeout}")
    return cfg, (source if (source is not None and not args.set) else None), n, source


def summary(out: Path) -> dict:
    """What a finished (or stopped) run left: rounds done of planned, accuracy, max epsilon, folder."""
    rows = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    last = rows[-1] if rows else {}
    planned = None
    try:
        from privlora.core.config import load_config

        planned = load_config(out / "config.toml").federation.rounds
    except Exception:  # noqa: BLE001 - a summary never fails the launcher
        pass
    return {"out": str(out), "rounds": last.get("round"), "rounds_planned": planned,
            "test_accuracy": last.get("test_accuracy"), "epsilon_max": last.get("epsilon_max"),
            **({"stopped": last["stopped"]} if last.get("stopped") else {})}


def _print_summary(info: dict, status: str) -> None:
    def num(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rounds = f"{num(info['rounds'])} of {num(info['rounds_planned'])} rounds"
    eps = "no DP" if info["epsilon_max"] is None else f"max epsilon {num(info['epsilon_max'])}"
    _say(f"{status}: {rounds}, held-out accuracy {num(info['test_accuracy'])}, {eps}; run folder {info['out']}")
    print(json.dumps(info))


def _launch(args: argparse.Namespace) -> int:
    cfg, cfg_file, n, source = validate_launch(args)
    out = Path(args.resume or args.out).resolve()
    work = out.parent / f"{out.name}-flower"
    if cfg_file is None:
        cfg_file = _resolved_config_file(cfg, source, work)
    noise_words = {"secure": "secure noise", "seeded": "seeded noise (reproducible, not for a real release)"}
    if args.simulation:
        _say(f"{n} virtual nodes on Flower's simulation engine, {noise_words[args.noise]} -> {out}")
        become_subreaper()  # Ray's daemons leave their parent; they come back to us to be ended
        try:
            run_simulation_engine(cfg_file, out, n, key_dir=args.keys, noise=args.noise)
        finally:
            for pid in descendants(os.getpid()):  # Ray's workers and daemons
                kill_tree(pid, grace=2.0)
            reap()
        info = summary(out)
        _print_summary(info, "finished")
        return 0
    nodes = node_configs(cfg_file, n, work / "nodes", args.noise, args.keys)
    _say(f"starting a SuperLink and {n} SuperNodes on 127.0.0.1, {noise_words[args.noise]}; logs in {work}")
    with LocalDeployment(nodes, work, tls=args.tls) as dep:
        _say(f"SuperLink on 127.0.0.1:{dep.port} and {n} SuperNodes up (pids {' '.join(map(str, dep.pids()))})")
        run_id = dep.submit({"config": str(Path(cfg_file).resolve()), "out": str(out), "resume": bool(args.resume),
                             "overwrite": args.overwrite})
        _say(f"Flower run {run_id} started; `flwr log {run_id} local --show` with FLWR_HOME={dep.home} for its output")
        status = dep.wait(run_id, args.timeout)
        try:
            (work / f"run-{run_id}.log").write_text(dep.logs(run_id), encoding="utf-8")
        except Exception:  # noqa: BLE001 - the log is a courtesy
            pass
    if status == "timeout":
        then = (f"continue with `python -m privlora.transports.flower.local --resume {out}` (a larger --timeout)"
                if (out / "checkpoint").is_dir() else "run the same command again with a larger --timeout")
        _say(f"error: the run did not finish within --timeout {args.timeout:.0f} s; every process was ended. The "
             f"server's output is in {work / f'run-{run_id}.log'}; {then}")
        return 1
    info = summary(out)
    if status != "finished:completed":
        err = out / "server-error.txt"
        _say(f"error: Flower run {run_id} ended {status}; the server's output is in {work / f'run-{run_id}.log'}"
             + (f" and the error in {err}" if err.is_file() else ""))
        return 1
    _print_summary(info, "finished")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m privlora.transports.flower.local", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=None, help="the federation's TOML (default: the embedded default)")
    ap.add_argument("--out", default=None, help="the run folder, as for privlora run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field, validated like the file, e.g. --set federation.rounds=3 (repeatable)")
    ap.add_argument("--nodes", type=int, default=0, help="number of nodes; must equal data.num_clients (the default)")
    ap.add_argument("--simulation", action="store_true", help="Flower's simulation engine instead of real processes")
    ap.add_argument("--tls", default=None, help="folder with ca.crt, server.pem, server.key")
    ap.add_argument("--keys", default=None, help="folder of `privlora keys simulation` (the config's secagg.key_registry and every client-K.key: a test deployment on one machine only)")
    ap.add_argument("--noise", default="secure", choices=("secure", "seeded"),
                    help="where every node draws DP noise from (also under --simulation); seeded is for tests only")
    ap.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from privlora.core.errors import UserError

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),  # even if started with it ignored
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup keeps meaning nohup
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _raise_terminated)
    try:
        return _launch(args)
    except UserError as exc:
        if args.debug:
            raise
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; every process the launcher started has been ended"
             + (f"; continue with `python -m privlora.transports.flower.local --resume {args.resume or args.out}`"
                if (args.resume or args.out) and (Path(args.resume or args.out) / "checkpoint").is_dir() else ""))
        return 130
    except Terminated as exc:
        _say(f"stopped by {exc}; every process the launcher started has been ended")
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - processes are already ended by the context manager
        if args.debug:
            raise
        _say(f"error: {type(exc).__name__}: {exc}; every process the launcher started has been ended "
             "(--debug for the traceback)")
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
