"""`nas compare`: the survey page (images, blind order, votes JSON) and the tally of votes.

The browser test drives the real page in headless Chromium through the DevTools protocol over
`--remote-debugging-pipe` (NUL-separated JSON on file descriptors 3 and 4: no websocket client, no
selenium): real mouse clicks on the radio buttons, the download button, the downloaded file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from nas.cli import main
from nas.core.errors import NasError
from nas.evaluate.ab_page import VOTES_FORMAT, build_compare, render_page, tally
from nas.sample import SampleSettings

CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = ["a large red circle in the centre", "small blue square on the left", "a green cross </script> <b>"]


@pytest.fixture(scope="module")
def page(sample_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "page"
    summary = build_compare(
        sample_world.run_stock,
        sample_world.run_flex,
        PROMPTS,
        out,
        SampleSettings(steps=3, batch_size=6),
        SampleSettings(steps=2, batch_size=6),
        n=2,
        page_seed=1,
        progress=False,
    )
    return out, summary


def _embedded(html: str) -> dict:
    start = html.index('<script type="application/json" id="data">') + len(
        '<script type="application/json" id="data">'
    )
    return json.loads(html[start : html.index("</script>", start)])


def test_page_pairs_every_prompt_and_seed_of_both_models_in_random_order(page):
    out, summary = page
    data = _embedded((out / "index.html").read_text())
    pairs = data["pairs"]
    assert len(pairs) == summary["pairs"] == 6
    # cost per model (3 and 2 CFG steps): in compare.json, not in the page (its id stays reproducible)
    assert (
        summary["cost"]["A"]["unet_evals_per_image"] == 6
        and summary["cost"]["B"]["unet_evals_per_image"] == 4
    )
    assert summary["cost"]["A"]["images"] == 6 and "cost" not in data["models"]["A"]
    assert [(p["prompt"], p["seed"]) for p in pairs] == [(q, s) for q in PROMPTS for s in (0, 1)]
    sides = [p["left_model"] for p in pairs]
    assert set(sides) == {"A", "B"}  # both orders occur (page_seed 1)
    for p in pairs:
        for side in ("left", "right"):
            assert (out / p[side]).is_file()
        assert p["left"].startswith(f"images/{p['left_model'].lower()}_")
        assert p["left"].split("_", 1)[1] == p["right"].split("_", 1)[1]  # same prompt and seed
    key = json.loads((out / "key.json").read_text())
    assert {int(k): v for k, v in key.items()} == {p["pair"]: p["left_model"] for p in pairs}
    assert data["models"]["A"]["steps"] == 3 and data["models"]["B"]["steps"] == 2
    assert data["models"]["A"]["model_sha256"] != data["models"]["B"]["model_sha256"]


def test_page_is_self_contained_and_prompts_cannot_break_out_of_the_data():
    html = render_page({"pairs": [{"prompt": "</script><script>alert(1)</script>"}]})
    assert html.count("</script>") == 2  # the data block's and the code's own
    assert _embedded(html)["pairs"][0]["prompt"] == "</script><script>alert(1)</script>"
    assert "http://" not in html and "https://" not in html and 'src="//' not in html


def _votes_file(
    path: Path, page_id: str, answers: list[tuple[str | None, str | None]], voter: str = ""
) -> Path:
    votes = [{"pair": i, "adherence": a, "aesthetics": b} for i, (a, b) in enumerate(answers)]
    path.write_text(json.dumps({"format": VOTES_FORMAT, "page": page_id, "voter": voter, "votes": votes}))
    return path


def test_tally_counts_wins_ties_and_runs_a_sign_test(tmp_path):
    one = _votes_file(tmp_path / "1.json", "p", [("B", "A"), ("B", "tie"), ("A", None)], "ann")
    two = _votes_file(tmp_path / "2.json", "p", [("B", "B"), ("B", "B"), ("B", "B")], "bob")
    result = tally([one, two])
    adherence, aesthetics = result["criteria"]["adherence"], result["criteria"]["aesthetics"]
    assert (adherence["A"], adherence["B"], adherence["tie"]) == (1, 5, 0)
    assert (aesthetics["A"], aesthetics["B"], aesthetics["tie"], aesthetics["unanswered"]) == (1, 3, 1, 1)
    assert adherence["b_preferred_share"] == pytest.approx(5 / 6)
    assert adherence["sign_test_p"] == pytest.approx(0.21875)  # two-sided binomial, 1 of 6
    assert result["voters"] == ["ann", "bob"]
    with pytest.raises(NasError, match="page"):
        tally([one, _votes_file(tmp_path / "3.json", "other", [])])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(NasError, match="format"):
        tally([tmp_path / "bad.json"])


def test_compare_cli_bad_input_is_one_line_exit_2(sample_world, tmp_path, capsys):
    run = str(sample_world.run_stock)
    assert main(["compare", run, "--out", str(tmp_path / "o")]) == 2
    assert "expected two run folders" in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("")
    assert main(["compare", run, run, "--prompts-file", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no prompts" in err and "\n" not in err
    assert main(["compare", run, run, "--steps-b", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--steps-b: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3: commands in, fd 4: out)."""

    def __init__(self, user_data: Path, downloads: Path):
        cmd_read, self._cmd_write = os.pipe()
        self._out_read, out_write = os.pipe()

        def child_fds():  # the browser expects exactly fds 3 and 4
            os.dup2(cmd_read, 3)
            os.dup2(out_write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--allow-file-access-from-files", f"--user-data-dir={user_data}", "--remote-debugging-pipe",
                 "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen([str(CHROMIUM), *flags], preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(cmd_read)
        os.close(out_write)
        self._id, self._buffer, self.events = 0, b"", []
        self.call(
            "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads), eventsEnabled=True
        )
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def _message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._out_read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._out_read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                params = event.get("params", {})
                if event.get("method") == method and all(params.get(k) == v for k, v in match.items()):
                    self.events.remove(event)
                    return params
            self.events.append(self._message(max(0.1, deadline - time.monotonic())))

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the centre of the element."""
        box = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)  # fmt: skip

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._cmd_write)
        os.close(self._out_read)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium (apt-get install chromium)")
def test_survey_page_in_headless_chromium_records_and_downloads_votes(page, tmp_path):
    out, _ = page
    pairs = _embedded((out / "index.html").read_text())["pairs"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = DevTools(tmp_path / "profile", downloads)
    try:
        browser.call("Page.navigate", session=True, url=(out / "index.html").resolve().as_uri())
        browser.wait_event("Page.loadEventFired")
        assert browser.js("document.querySelectorAll('section.pair').length") == len(pairs)
        loaded = "Array.from(document.images).every((i) => i.complete && i.naturalWidth === 32)"
        assert browser.js(loaded), "an image did not load"
        assert browser.js("document.querySelector('.prompt').textContent") == f"1. {PROMPTS[0]}"
        assert browser.js("document.getElementById('pair-4').querySelector('.prompt').textContent").endswith(
            PROMPTS[2]
        )  # shown as text, not parsed as markup
        # The voter prefers the left image for adherence everywhere, and rates pair 0 a tie on looks.
        for p in pairs:
            browser.click(f"#adherence-{p['pair']}-left")
        browser.click("#aesthetics-0-tie")
        assert (
            browser.js("document.getElementById('progress').textContent")
            == f"1 of {len(pairs)} pairs answered"
        )
        browser.click("#voter")
        browser.call("Input.insertText", session=True, text="ann")
        shot = browser.call("Page.captureScreenshot", session=True, format="png")["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
        browser.click("#download")
        done = browser.wait_event("Page.downloadProgress", state="completed")
        assert done["totalBytes"] > 0
        shown = json.loads(browser.js("document.getElementById('votes').value"))
    finally:
        browser.close()
    files = list(downloads.iterdir())
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["votes"] == shown["votes"] and saved["voter"] == "ann"
    assert saved["format"] == VOTES_FORMAT and saved["complete"] is False and saved["answered"] == 1
    for vote, p in zip(saved["votes"], pairs):
        assert vote["adherence_side"] == "left" and vote["adherence"] == p["left_model"]  # unblinded right
    assert saved["votes"][0]["aesthetics"] == "tie" and saved["votes"][1]["aesthetics"] is None
    result = tally(files)
    wins_a = sum(p["left_model"] == "A" for p in pairs)
    assert result["criteria"]["adherence"]["A"] == wins_a
    assert result["criteria"]["adherence"]["B"] == len(pairs) - wins_a
    assert (tmp_path / "page.png").stat().st_size > 5000
