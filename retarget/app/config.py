"""The app's settings: where it listens, which weights it uses, and the upload limits."""

from __future__ import annotations

from dataclasses import dataclass, field

VIDEO_TYPES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
PHOTO_TYPES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class AppOptions:
    """Everything `retarget app` can be told (the CLI is generated from these fields)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 exposes the app to the network)"})
    port: int = field(default=7860, metadata={"help": "port to listen on"})
    max_upload_mb: float = field(default=500.0, metadata={"help": "largest accepted upload, in MB"})
    max_video_s: float = field(default=600.0, metadata={"help": "longest accepted driving clip, in seconds"})
    max_photo_px: int = field(default=8192, metadata={"help": "largest accepted photo side, in pixels"})
    max_panels: int = field(default=24, metadata={"help": "most storyboard panels or keyframes in one job"})
    device: str = field(default="auto", metadata={"help": "where to run the models", "choices": ("auto", "cuda", "cpu")})
    sessions_dir: str | None = field(default=None, metadata={"help": "folder for per-session outputs (default: a temporary folder, removed on exit)", "metavar": "DIR"})
    queue_size: int = field(default=16, metadata={"help": "most jobs waiting in the queue"})

    def validate(self) -> None:
        """RetargetError on a setting that cannot work (checked before anything is loaded)."""
        from render.errors import RetargetError

        if not 0 < self.port < 65536:
            raise RetargetError(f"--port {self.port}: use 1-65535")
        for name in ("max_upload_mb", "max_video_s", "max_photo_px", "max_panels", "queue_size"):
            if not getattr(self, name) > 0:
                raise RetargetError(f"--{name.replace('_', '-')} must be > 0")
