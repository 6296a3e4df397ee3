"""Joining a multi-process run: from the command line's --num-processes, --coordinator and
--process-id, or by JAX itself on TPU VMs and in SLURM jobs. Each process joins before it builds
anything, and a process that cannot (a port taken, a peer missing) says so in one line."""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading
import time
from typing import NoReturn


MAX_JOIN_TIMEOUT_S = 86400  # (JAX takes its timeouts as 32-bit integers)
MAX_PROCESSES = 2**20  # process 0's coordination service keeps state per process: 2**31 of them fill the memory


def check_process_flags(args) -> None:
    """ValueError unless --num-processes, --coordinator and --process-id make a run: N > 1 with a
    coordinator HOST:PORT and 0 <= I < N, or a single process (N of 1 or not given, and then
    neither of the others: a lone process would train the shared workdir as process 0)."""
    n, coordinator, process_id = args.num_processes, args.coordinator, args.process_id
    if n is not None and not 1 <= n <= MAX_PROCESSES:
        raise ValueError(f"--num-processes must be a positive integer up to 2**20 ({MAX_PROCESSES:,}), got {n}")
    if (n is None or n == 1) and (coordinator is not None or process_id is not None):
        flags = " and ".join(flag for flag, value in (("--coordinator", coordinator), ("--process-id", process_id))
                             if value is not None)
        given = "without --num-processes" if n is None else "with --num-processes 1"
        both = " and " in flags
        raise ValueError(f"{flags} {'join' if both else 'joins'} a multi-process run, and {'are' if both else 'is'} "
                         f"given {given}; give --num-processes N > 1 with --coordinator and --process-id (or drop "
                         f"{flags} for a single process)")
    if n is not None and (n > 1 and (coordinator is None or process_id is None)
                          or process_id is not None and not 0 <= process_id < n):
        raise ValueError(f"--num-processes {n} needs --coordinator HOST:PORT and --process-id I with 0 <= I < {n}, "
                         f"got --coordinator {coordinator} --process-id {process_id}")
    if coordinator is not None:
        match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d{1,5})", coordinator)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(f"--coordinator {coordinator}: expected HOST:PORT with a port in 1..65535, e.g. "
                             f"10.0.0.2:1234 (process 0's host)")


def joins_others(args) -> bool:
    """Whether `join_run` joins this process to others: explicitly from flags, or automatically on
    TPU VMs and in SLURM jobs of several tasks (unless LLAMA_JAX_SINGLE_PROCESS is set, as a sweep
    does for trials sharing one host). Imports no JAX."""
    from llama_jax.devices import on_tpu_vm

    if args.num_processes is not None and args.num_processes > 1:
        return True
    if os.environ.get("LLAMA_JAX_SINGLE_PROCESS"):
        return False
    return on_tpu_vm() or bool(os.environ.get("SLURM_JOB_ID")) and _slurm_tasks() > 1


def join_run(args) -> None:
    """Join a multi-process run, where `joins_others` says this process is one of several."""
    import jax

    if not joins_others(args):
        return
    if args.num_processes is not None and args.num_processes > 1:
        if args.process_id == 0 and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):  # (else JAX binds that)
            _check_coordinator_port(args.coordinator)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only; harmless elsewhere
        _join_processes(args.join_timeout, coordinator_address=args.coordinator, num_processes=args.num_processes,
                        process_id=args.process_id)
        _check_process_counts_agree(args.num_processes)
    else:
        _join_processes(args.join_timeout)  # JAX reads the topology from the TPU metadata server or SLURM


def _check_process_counts_agree(num_processes: int) -> None:
    """ValueError, in every process that joined, unless all were given this --num-processes: process
    0's count is the run's, and one told another count joined it without a word."""
    import jax

    counts = [int(count) for count in exchange(str(num_processes))]
    if len(set(counts)) > 1:
        given = ", ".join(f"process {p}: {n}" for p, n in enumerate(counts))
        refuse_together(ValueError(f"the {jax.process_count()} processes that joined were given different "
                                   f"--num-processes ({given}); give every process the same count"))


_exchanges = itertools.count()


def exchange(text: str) -> list[str]:
    """Every process's non-empty `text`, in process order, through the coordination service's
    key-value store (processes of unlike device counts cannot gather arrays). Every process calls it
    at the same points, and each reads every text before any of them goes on (and may stop)."""
    import jax

    client = jax._src.distributed.global_state.client
    name = f"llama_jax_exchange/{next(_exchanges)}"
    client.key_value_set(f"{name}/{jax.process_index()}", text)
    texts = [client.blocking_key_value_get(f"{name}/{p}", 300_000) for p in range(jax.process_count())]
    client.wait_at_barrier(f"{name}/read", timeout_in_ms=300_000)
    return texts


def refuse_together(error: Exception) -> NoReturn:
    """Raise `error` in a process of a multi-process run that every process refuses at this point,
    from the same exchanged values, after leaving the run with the others: JAX's shutdown barrier
    keeps process 0's coordination service up until every process has left, where a process still
    on its way out could find it gone and fail on that instead (its own line lost)."""
    import jax

    jax.distributed.shutdown()
    raise error


def _check_coordinator_port(coordinator: str) -> None:
    """ValueError when process 0 cannot serve the run's coordination on the port of `coordinator`, on
    every interface, as JAX binds it: held by another program (gRPC, binding it with SO_REUSEPORT,
    shares a port another coordinator holds; a port it cannot bind at all ends process 0 with a
    segmentation fault) or reserved."""
    import socket

    port = int(coordinator.rsplit(":", 1)[1])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):  # IPv6 also covers IPv4
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (an earlier run's closed connections)
                if family == socket.AF_INET6:  # dual stack, as gRPC listens, whatever the system's default
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind((host, port))
            return
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ValueError(f"--coordinator {coordinator}: process 0 cannot listen on port {port} ({e.strerror}); "
                                 f"choose a free port this user may open (the same for every process)") from None
            # no IPv6 on this host: try IPv4; other errors are left to JAX


def _slurm_tasks() -> int:
    """SLURM_NTASKS, the processes of the SLURM job this one belongs to (1 if unset)."""
    text = os.environ.get("SLURM_NTASKS", "1")
    if not text.strip().isdigit():
        raise ValueError(f"SLURM_NTASKS={text!r} (SLURM_JOB_ID is set): expected the job's number of tasks, a positive "
                         f"integer; run inside a SLURM job step, or unset SLURM_JOB_ID outside one")
    return int(text)


def _join_processes(timeout_s: int, **settings) -> None:
    """`jax.distributed.initialize(**settings)`, which waits for every process to join, and the
    start of the backend, in a thread of its own: the main thread waits in Python, where Ctrl-C and
    SIGTERM still stop the command (a signal cannot interrupt the native call), and where a process
    missing after `timeout_s` is reported in one line (JAX's own timeout, set later, aborts in C++)."""
    import jax

    failure: list[BaseException] = []
    joined = threading.Event()

    def join():
        try:
            jax.distributed.initialize(**settings, initialization_timeout=timeout_s + 60)
            joined.set()
            # the backend's start, where the processes exchange their devices, here too, and then a barrier: once
            # the start is done in every process, one that refuses its settings and exits (a device count unlike
            # the others', found at once) no longer breaks another's start still under way (an abort in XLA)
            jax.devices()
            # (the distributed client JAX keeps is not public API; Orbax calls its barriers the same way)
            jax._src.distributed.global_state.client.wait_at_barrier("llama_jax_started", timeout_in_ms=300_000)
        except BaseException as e:  # handed to the main thread
            failure.append(e)

    joining = threading.Thread(target=join, name="llama-jax-join-processes", daemon=True)
    joining.start()
    deadline = time.monotonic() + timeout_s
    while joining.is_alive():
        joining.join(0.2)
        if not joined.is_set() and not failure and time.monotonic() > deadline:
            if settings:
                raise ValueError(f"the {settings['num_processes']} processes of the run did not all join at "
                                 f"{settings['coordinator_address']} within {timeout_s} s (--join-timeout)"
                                 + _unreachable(settings['coordinator_address']))
            raise ValueError(f"the processes of this multi-host job did not all join within {timeout_s} s "
                             f"(--join-timeout); every host (TPU worker or SLURM task) runs the same command")
    if failure:
        raise failure[0]


def _unreachable(coordinator: str) -> str:
    """What to do about a run whose processes did not all join at `coordinator`: why this process
    cannot reach it (a host that does not resolve, a port nothing listens on, no answer), or, when
    it can, that a process is missing."""
    import socket

    host, port = coordinator.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except socket.gaierror:
        return f": {host} does not resolve to an address here; give --coordinator as process 0's HOST:PORT"
    except ConnectionRefusedError:
        return (f": nothing listens at {coordinator}; start process 0 with the same --coordinator, or give "
                f"--coordinator as process 0's HOST:PORT")
    except OSError as e:
        return (f": {coordinator} does not answer from here ({e.strerror or e}); give --coordinator as process 0's "
                f"HOST:PORT, its port open to every process")
    return "; start every process with the same command and --num-processes, each with its own --process-id"
