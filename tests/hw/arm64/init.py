#!/usr/bin/python3
"""/init of the arm64 emulation test: run ``s2split hw run`` and
``s2split fidelity record``, and report.

The kernel passes ``S2SPLIT_ARGS`` (the ``hw run`` arguments as a JSON list,
urlsafe-base64 encoded, from the kernel command line) in the environment, and
optionally ``S2SPLIT_RECORD`` (a JSON list of ``fidelity record`` argument
lists, encoded the same way; each writes a fixture). The outcome -- exit
status, output, the JSON results and fixtures -- goes to the console as one
base64 line between markers, then the VM powers off.
"""

import base64
import ctypes
import json
import os
import subprocess
import sys

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype):
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        print(f"init: mount {target}: errno {ctypes.get_errno()}", flush=True)


def main():
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    mount("tracefs", "/sys/kernel/tracing", "tracefs")
    args = json.loads(base64.urlsafe_b64decode(os.environ.get("S2SPLIT_ARGS", "W10=")))
    env = dict(os.environ, PYTHONPATH="/opt/s2split", PYTHONDONTWRITEBYTECODE="1")
    out = {"argv": args}
    try:
        with open("/proc/version") as f:
            out["proc_version"] = f.read().strip()
        proc = subprocess.run([sys.executable, "-m", "s2split.hw", "run", *args,
                               "--json", "/tmp/result.json"],
                              capture_output=True, text=True, env=env, timeout=1500)
        out.update(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        if os.path.exists("/tmp/result.json"):
            with open("/tmp/result.json") as f:
                out["result"] = json.load(f)
        records = json.loads(base64.urlsafe_b64decode(os.environ.get("S2SPLIT_RECORD", "W10=")))
        out["records"] = []
        for i, rec_args in enumerate(records):
            path = f"/tmp/fixture{i}.json"
            proc = subprocess.run([sys.executable, "-m", "s2split.hw.record", *rec_args,
                                   "--output", path], capture_output=True, text=True,
                                  env=env, timeout=1500)
            rec = {"argv": rec_args, "returncode": proc.returncode, "stdout": proc.stdout,
                   "stderr": proc.stderr}
            if os.path.exists(path):
                with open(path) as f:
                    rec["fixture"] = json.load(f)
            out["records"].append(rec)
        if records:  # what the recorder left in tracefs: nothing of its own
            with open("/sys/kernel/tracing/kprobe_events") as f:
                out["kprobe_events_after"] = f.read()
            out["instances_after"] = os.listdir("/sys/kernel/tracing/instances")
        # prove the harness ran without numpy: it is not installed here at all
        probe = subprocess.run([sys.executable, "-c", "import numpy"], capture_output=True)
        out["numpy_importable"] = probe.returncode == 0
    except BaseException as e:  # report everything; never hang the VM
        out["init_error"] = repr(e)
    blob = base64.b64encode(json.dumps(out).encode()).decode()
    print("\nS2SPLIT-RESULT-BEGIN", flush=True)
    for i in range(0, len(blob), 1024):
        print(blob[i:i + 1024], flush=True)
    print("S2SPLIT-RESULT-END", flush=True)


try:
    main()
finally:
    libc.sync()
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
