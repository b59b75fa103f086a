"""Logs for journald: `--log-format json` (or EDGECOOP_LOG_FORMAT=json) writes one JSON object per record, and under
systemd (JOURNAL_STREAM names our stderr) each line carries its syslog priority for journalctl -p."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgecoop.logs import JsonFormatter, formatter_for

EDGECOOP = Path(sys.executable).with_name("edgecoop")


def test_a_json_record_is_one_line_with_its_exception():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("edgecoop.x", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert (data["level"], data["logger"], data["message"]) == ("ERROR", "edgecoop.x", "failed: a\nb")
    assert "ValueError: bad" in data["exception"] and data["ts"].endswith("+00:00") and data["pid"] == os.getpid()


def test_the_journal_gets_syslog_priorities_and_other_streams_do_not(monkeypatch, tmp_path):
    record = logging.LogRecord("edgecoop.x", logging.WARNING, __file__, 1, "careful", (), None)
    with (tmp_path / "stream").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert not formatter_for("text", stream).format(record).startswith("<")
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert formatter_for("text", stream).format(record).startswith("<4>")
        assert json.loads(formatter_for("json", stream).format(record).removeprefix("<4>"))["message"] == "careful"
    with pytest.raises(ValueError):
        formatter_for("xml", sys.stderr)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--log-format", "xml"], {}, "invalid choice: 'xml'"),
        ([], {"EDGECOOP_LOG_FORMAT": "xml"}, "EDGECOOP_LOG_FORMAT must be one of text, json, not 'xml'"),
    ],
)
def test_an_unknown_log_format_is_refused(args, env, message):
    result = subprocess.run([str(EDGECOOP), *args, "broker", "--print-config", "acl"], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr


def test_an_agent_under_systemd_logs_its_broker_loss_as_a_json_warning(private_broker, tmp_path):
    """EDGECOOP_LOG_FORMAT=json in the environment (as edgecoop.env sets it) and stderr as the journal stream."""
    config = tmp_path / "echo-log.toml"
    config.write_text('[agent]\nid = "echo-log"\n\n[[capabilities]]\nkind = "echo"\n')
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**os.environ, "EDGECOOP_LOG_FORMAT": "json", "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    proc = subprocess.Popen([str(EDGECOOP), "agent", str(config), "--broker", private_broker.url], env=env,
                            stdout=subprocess.PIPE, stderr=write_end, text=True)  # fmt: skip
    os.close(write_end)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        with os.fdopen(read_end) as stderr:
            for line in stderr:
                lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        assert "online at" in proc.stdout.readline()  # the agent is connected and its card published
        private_broker.stop()
        while True:
            line = lines.get(timeout=20)  # the loss is logged at once (the broker closed the socket)
            if "lost" in line:
                break
        assert line.startswith("<4>{"), line
        record = json.loads(line.removeprefix("<4>"))
        assert record["level"] == "WARNING" and record["logger"] == "edgecoop.connection"
        assert f"connection to {private_broker.url} lost" in record["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        if proc.stdout:
            proc.stdout.close()
        reader.join(10)
