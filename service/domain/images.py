"""Which configured versions the engine can run: each version's image is
available, being pulled, or missing (with the reason)."""

from __future__ import annotations

import logging
import threading
import time

from ..errors import DbprovError, ImageMissing, ImagePulling, RuntimeUnavailable
from ..runtime.protocol import ServerRuntime
from ..settings import Settings

log = logging.getLogger(__name__)

AVAILABLE = "available"
PULLING = "pulling"
MISSING = "missing"
# An image seen once is taken to stay: looking again costs every create a
# call to the engine. If it is removed after all, provisioning meets it and
# the database fails with the same message.
_TRUST_AVAILABLE = 60.0


class Images:
    def __init__(self, settings: Settings, runtime: ServerRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self._lock = threading.Lock()
        # version -> (state, reason, when it was seen)
        self._seen: dict[str, tuple[str, str, float]] = {}
        self._pulls: dict[str, threading.Thread] = {}

    def check(self, pull: bool = True) -> dict[str, str]:
        """Every configured version's state, looked up now: "available",
        "pulling", or "missing: <why>". With ``pull``, a missing image is
        pulled in the background once per process, if pulling is on."""
        return {
            version: self._describe(*self._state(version, fresh=True, pull=pull))
            for version in self.settings.images
        }

    def require(self, version: str) -> None:
        """Return if ``version`` can be provisioned; ``ImageMissing`` or ``ImagePulling`` if not."""
        state, reason = self._state(version)
        image = self.settings.images[version]
        if state == PULLING:
            raise ImagePulling(f"the image {image} of version {version} is being pulled; try again shortly")
        if state == MISSING:
            ready = [v for v in self.settings.images if v != version and self._state(v)[0] == AVAILABLE]
            raise ImageMissing(
                f"version {version} needs the image {image}, which the Docker engine does not "
                f"have: {reason}. Available: {', '.join(ready) or 'none'}. An operator can "
                "run `dbprov images pull`.",
                image=image,
                version=version,
            )

    def available(self, version: str) -> bool:
        try:
            return self._state(version)[0] == AVAILABLE
        except RuntimeUnavailable:
            return False

    def _state(self, version: str, fresh: bool = False, pull: bool = True) -> tuple[str, str]:
        with self._lock:
            seen = self._seen.get(version)
        if (
            not fresh
            and seen is not None
            and seen[0] == AVAILABLE
            and time.monotonic() - seen[2] < _TRUST_AVAILABLE
        ):
            return seen[0], seen[1]
        with self._lock:
            pulling = self._pulls.get(version)
            if pulling is not None and pulling.is_alive():
                return PULLING, ""
        image = self.settings.images[version]
        if self.runtime.has_image(image):
            return self._remember(version, AVAILABLE, "")
        if pull and self.settings.pull_images and self._start_pull(version):
            return PULLING, ""
        with self._lock:
            seen = self._seen.get(version)
        if seen is not None and seen[0] == MISSING:
            return MISSING, seen[1]
        return MISSING, "pulling is off (DBPROV_PULL_IMAGES)" if not self.settings.pull_images else "not pulled"

    def _remember(self, version: str, state: str, reason: str) -> tuple[str, str]:
        with self._lock:
            self._seen[version] = (state, reason, time.monotonic())
        return state, reason

    def _start_pull(self, version: str) -> bool:
        """Start pulling ``version``'s image unless this process tried already."""
        with self._lock:
            if version in self._pulls:
                return False
            thread = threading.Thread(
                target=self._pull, args=(version,), name=f"dbprov-pull-{version}", daemon=True
            )
            self._pulls[version] = thread
        thread.start()
        return True

    def _pull(self, version: str) -> None:
        image = self.settings.images[version]
        log.info("pulling image %s for version %s", image, version)
        try:
            self.runtime.pull_image(image)
        except DbprovError as exc:
            # Expected where no registry answers: one line, no traceback.
            log.warning("version %s unavailable: %s", version, exc.detail)
            self._remember(version, MISSING, exc.detail)
            return
        log.info("pulled image %s", image)
        self._remember(version, AVAILABLE, "")

    @staticmethod
    def _describe(state: str, reason: str) -> str:
        return f"{state}: {reason}" if reason else state
