"""A writer stage run in a process of its own: the job's writer thread only hands each frame over
a pipe, and the child pastes back, converts and encodes (retarget.video_sink.VideoSink.open, the
same code as in the job's process).

Why: in the job's process, paste-back, the RGB -> YUV conversion and PyAV's encode calls take the
GIL between their native parts, thousands of times a second at 1080p, and each time the render
loop waits for it. A compiled fast-mode renderer is Python-bound enough to notice: its calls ran
13% slower after tracking than alone on an H100 (bench/NOTES_run.md, 2026-12-07). Here the parent
pays one pipe write of the face (0.8 MB at 512 px) per frame.

    parent (writer thread)            child (`python -c`, started with one socket; imports no torch)
    --(the spec, pickled)-->                                 sink = spec.open()
    write(i, face) --("frame", i, shape, dtype) + bytes-->  sink's write(i, face)
    video.set_audio_range(a, b) --("audio", a, b)-->         sink.video.set_audio_range(a, b)
    exit normally  --("close")-->  sink exits normally (outputs renamed in)  --("done")-->
    exit on error  --("abort")-->  sink exits with an error (outputs deleted) --("error", ...)-->

Bounded memory: the pipe's buffer and the child's sink (PASTE_AHEAD frames); a parent that runs
ahead blocks in its write. An error in the child is sent back, the child then only drains frames
until told to stop, and the parent raises the error at its next write or at exit; a child that
dies gives one clear RetargetError and its temporary file is deleted here.

The child is a fresh interpreter (subprocess, not multiprocessing's spawn): spawn re-runs the
caller's main script in the child, so a user's script without an `if __name__ == "__main__":`
guard ran its whole job again inside the writer and the parent waited for it.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from render.errors import RetargetError

# The writer process's niceness: it only has to keep up on average, while the render loop's thread
# must get a core the moment it wants one (x264 alone starts 1.5 threads per core).
WRITER_NICE = 10
JOIN_S = 30.0  # how long exit waits for the child to finish the video (x264's flush) before stopping it
_CHILD = ("import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('RETARGET_WRITER_PATH')); "
          "from retarget.sink_process import _main; _main(int(sys.argv[1]), int(sys.argv[2]))")
_running: set = set()  # the writer processes started here that have not been waited for (`running`)


def running() -> list[int]:
    """Process ids of the writer processes of this process that are still running."""
    for p in [p for p in _running if p.poll() is not None]:
        _running.discard(p)
    return sorted(p.pid for p in _running)


class SinkProcess:
    """`spec.open()` (a picklable object whose `open()` gives a sink: a context manager whose value
    is write(i, image) for i in order; `spec.fps`: its frame rate) run in a child process. Used as
    the sink itself: entering starts the child and gives write(i, image) for (H, W, 3) uint8
    images. `video` is this object (the job's early writer asks a sink's `video` for `fps` and
    `set_audio_range`, which a VideoSink's VideoWriter has; here they go to the child's)."""

    def __init__(self, spec):
        self.spec = spec
        self.fps = float(spec.fps)
        self.video = self
        self._conn = None
        self._proc = None
        self._error: BaseException | None = None
        self._partials: list[Path] = []  # the child's temporary files: deleted here if it dies

    def __enter__(self):
        mine, theirs = socket.socketpair()
        env = dict(os.environ, RETARGET_WRITER_PATH=json.dumps(sys.path))
        with theirs:  # never fork a process that holds CUDA and threads: a new interpreter
            self._proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(theirs.fileno()), str(WRITER_NICE)],
                                          pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        _running.add(self._proc)
        self._conn = Connection(mine.detach())
        self._send(("spec", pickle.dumps(self.spec)))
        return self.write

    def write(self, i: int, image: np.ndarray) -> None:
        self._raise_sent()
        image = np.ascontiguousarray(image)
        self._send(("frame", int(i), image.shape, image.dtype.str), image)

    def set_audio_range(self, start_s: float, end_s: float) -> None:
        self._raise_sent()
        self._send(("audio", float(start_s), float(end_s)))

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._send(("close",))
                self._wait_reply()
                if self._error is not None:
                    raise self._error
            else:
                try:
                    self._conn.send(("abort",))
                    self._wait_reply()
                except (OSError, EOFError, RetargetError):
                    pass  # the child is gone or stuck: the job's own error is the one to tell
        finally:
            self._stop()
        return False

    # -- the pipe ---------------------------------------------------------------------
    def _send(self, msg: tuple, payload: np.ndarray | None = None) -> None:
        try:
            self._conn.send(msg)
            if payload is not None:
                self._conn.send_bytes(memoryview(payload).cast("B"))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self._raise_sent()  # the child said why before it went
            raise self._died() from None

    def _take(self, msg: tuple) -> None:
        if msg[0] == "error" and self._error is None:
            self._error = _exception(msg[1])
        elif msg[0] == "partial":
            self._partials.append(Path(msg[1]))

    def _pump(self) -> None:
        """Take what the child has sent so far (never blocks)."""
        try:
            while self._conn.poll():
                self._take(self._conn.recv())
        except (EOFError, OSError):
            pass

    def _raise_sent(self) -> None:
        """Raise the error the child sent, if any (never blocks)."""
        self._pump()
        if self._error is not None:
            raise self._error

    def _wait_reply(self) -> None:
        """Wait for the child's last word ("done" or "error"); a child that ends without one died."""
        while True:
            try:
                if self._conn.poll(1.0):
                    msg = self._conn.recv()
                    self._take(msg)
                    if msg[0] in ("done", "error"):
                        return
                    continue
                if self._proc.poll() is None:
                    continue
            except (EOFError, OSError):
                pass
            if self._error is None:
                self._error = self._died()
            return

    def _died(self) -> RetargetError:
        self._pump()
        code = _wait(self._proc, 5.0)
        self._drop_partials()
        return RetargetError(f"the video writer process ended unexpectedly (exit code {code}); "
                             f"{self.spec.out} was not written")

    def _stop(self) -> None:
        self._conn.close()  # a child still draining frames sees the end of the pipe
        if _wait(self._proc, JOIN_S) is None:
            self._proc.kill()
            _wait(self._proc, 5.0)
            self._drop_partials()
        _running.discard(self._proc)

    def _drop_partials(self) -> None:
        for p in self._partials:  # a killed child cannot delete its temporary files
            p.unlink(missing_ok=True)


def _exception(blob: bytes) -> BaseException:
    try:
        return pickle.loads(blob)
    except Exception:  # noqa: BLE001 - a class the parent cannot rebuild
        return RetargetError("the video writer process failed (its error could not be read back)")


def _picklable(e: BaseException) -> bytes:
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001
        return pickle.dumps(RetargetError(f"video writer: {type(e).__name__}: {e}"))


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code (negative: the signal that ended it), or None if still running."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _main(fd: int, nice: int) -> None:
    """The child's entry: the socket `fd` to the parent, niceness raised by `nice`."""
    _serve(Connection(fd), nice)


def _serve(conn, nice: int = 0) -> None:
    """The child: the spec, then frames from `conn` through `spec.open()`'s sink until "close" or
    "abort", at niceness `nice` (raised by that much; its threads, x264's too, inherit it)."""
    import signal

    if nice:
        try:
            os.nice(nice)
        except (OSError, AttributeError):  # not allowed, or not POSIX: the same video, just not yielding
            pass

    # Ctrl-C reaches the whole process group: the parent decides (it sends "abort"), so the video is
    # never cut off here while the job still saves its frames for --resume.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    closing = False
    try:
        msg = conn.recv()
        if msg[0] != "spec":
            return
        sink = pickle.loads(msg[1]).open()
        partial = getattr(getattr(sink, "video", None), "partial", None)
        if partial is not None:
            _reply(conn, ("partial", str(partial)))
        with sink as write:
            while True:
                msg = conn.recv()
                if msg[0] == "frame":
                    _, i, shape, dtype = msg
                    write(i, np.frombuffer(conn.recv_bytes(), np.dtype(dtype)).reshape(shape))
                elif msg[0] == "audio":
                    sink.video.set_audio_range(msg[1], msg[2])
                elif msg[0] == "close":
                    closing = True
                    break
                else:
                    raise _Aborted()
    except _Aborted:
        _reply(conn, ("done",))
        return
    except EOFError:
        return  # the parent is gone: the sink's exit has deleted the unfinished outputs
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        _reply(conn, ("error", _picklable(e)))
        if not closing:  # the parent may still be sending frames: take them until it stops
            _drain(conn)
        return
    _reply(conn, ("done",))


class _Aborted(Exception):
    """The job failed elsewhere: the sink ends with an error, so its outputs vanish."""


def _reply(conn, msg: tuple) -> None:
    try:
        conn.send(msg)
    except OSError:
        pass


def _drain(conn) -> None:
    """After an error: read and drop what the parent still sends, until it stops."""
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "frame":
                conn.recv_bytes()
            elif msg[0] in ("close", "abort"):
                return
    except (EOFError, OSError):
        return
