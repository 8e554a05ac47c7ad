"""`python -m l3ptp.controller` as a real process: start, answer the CLI, SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from l3ptp.controller import cli
from tests.support.fake_helper import FakeHelper


def test_controller_process_serves_status_and_exits_on_sigterm() -> None:
    with tempfile.TemporaryDirectory(prefix="l3p-") as tmp:
        runtime = os.path.join(tmp, "run")
        os.mkdir(runtime)
        config = os.path.join(tmp, "l3ptp.toml")
        with socket.socket() as probe:  # a free loopback port for the metrics endpoint
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with open(config, "w") as fh:
            fh.write(
                f'[node]\nid = "alpha"\nkey_file = "/etc/l3ptp/node.key"\n'
                f'[controller]\nruntime_dir = "{runtime}"\nhelper_socket = "{runtime}/helper.sock"\n'
                f"[metrics]\nenabled = true\naddress = \"127.0.0.1\"\nport = {port}\n"
            )
        loop = asyncio.new_event_loop()
        helper = FakeHelper()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(helper.serve_path(os.path.join(runtime, "helper.sock")))
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert ready.wait(5)
        proc = subprocess.Popen(
            [sys.executable, "-m", "l3ptp.controller", "--config", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            control = os.path.join(runtime, "control.sock")
            deadline = time.monotonic() + 20
            out = io.StringIO()
            while True:
                if os.path.exists(control):
                    out = io.StringIO()
                    rc = cli.main(["--runtime-dir", runtime, "--timeout", "2", "status"], out=out, err=io.StringIO())
                    if rc == 0:
                        break
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "controller did not come up"
                time.sleep(0.1)
            assert "no networks configured" in out.getvalue()
            # Without --runtime-dir the CLI finds the socket through the configuration file.
            via_config = io.StringIO()
            assert cli.main(["--config", config, "status"], out=via_config, err=io.StringIO()) == 0
            assert f"pid {proc.pid}" in via_config.getvalue()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            names = {f.name for f in text_string_to_metric_families(body)}
            assert "l3ptp_network_state" in names
            assert f"pid {proc.pid}" in out.getvalue()
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=20)
            assert proc.returncode == 0, stderr
            assert not os.path.exists(control)
            assert '"controller_ready"' in stdout or "controller_ready" in stdout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            asyncio.run_coroutine_threadsafe(helper.close(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
