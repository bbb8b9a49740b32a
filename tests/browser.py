"""A page opened in Debian's headless Chromium and driven as a person would: load it, click what
the page shows, read its text, take screenshots, and collect its script errors.

It speaks the Chrome DevTools protocol over `--remote-debugging-pipe` (JSON messages ending in a
NUL byte on file descriptors 3 and 4), so it needs no package beyond the standard library.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, url: str, width: int = 1400, height: int = 1800, timeout: float = 60):
        self.timeout, self.errors, self.events = timeout, [], []
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()

        def pipes_on_3_and_4():  # in the child, before exec: Chromium reads fd 3, writes fd 4
            high_in, high_out = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pipes_on_3_and_4, pass_fds=(3, 4))
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._next_id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", url=url)
        self.wait_for("the page to load", lambda: any(e["method"] == "Page.loadEventFired" for e in self.events))

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(message)
        if "method" in message:
            self._note(message)
        return message

    def _note(self, event: dict) -> None:
        self.events.append(event)
        params = event.get("params", {})
        if event["method"] == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text"))
        elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])

    def send(self, method: str, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, what: str, condition, timeout: float | None = None):
        deadline = time.time() + (timeout or self.timeout)
        while time.time() < deadline:
            value = condition()
            if value:
                return value
            try:
                self._receive(time.time() + 0.2)
            except TimeoutError:
                pass
        raise TimeoutError(f"waited for {what}")

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def frame_texts(self) -> list[str]:
        """The visible text of each child frame (iframes with data: URLs are cross-origin to the page)."""
        texts = []
        for child in self.send("Page.getFrameTree")["frameTree"].get("childFrames", []):
            context = self.send("Page.createIsolatedWorld", frameId=child["frame"]["id"])["executionContextId"]
            result = self.send("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                               contextId=context, returnByValue=True)
            texts.append(result["result"].get("value") or "")
        return texts

    def wait_for_text(self, text: str, timeout: float | None = None) -> None:
        self.wait_for(f"'{text}' on the page", lambda: text in self.text(), timeout)

    def click(self, text: str) -> None:
        """Click the innermost visible element whose text is exactly `text`."""
        found = self.evaluate(f"""(() => {{
            const all = [...document.querySelectorAll('body *')].filter(e =>
                e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);
            const inner = all.filter(e => !all.some(o => o !== e && e.contains(o)));
            if (!inner.length) return false;
            inner[0].click();
            return true;
        }})()""")
        if not found:
            raise LookupError(f"nothing to click that reads '{text}'")

    def click_css(self, selector: str, index: int = 0) -> int:
        """Click the index-th element matching the CSS `selector`; return how many match."""
        return self.evaluate(f"""(() => {{
            const all = document.querySelectorAll({json.dumps(selector)});
            if (all.length > {index}) all[{index}].click();
            return all.length;
        }})()""")

    def images(self) -> list[dict]:
        """The page's visible images that loaded: source prefix and rendered size."""
        return self.evaluate("""[...document.images].filter(i => i.complete && i.naturalWidth > 0
            && i.offsetParent !== null).map(i => ({src: i.src.slice(0, 40), width: i.width, height: i.height}))""")

    def screenshot(self, path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as out:
            out.write(base64.b64decode(data))

    def close(self) -> None:
        self.session = None  # a browser-wide command
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)
