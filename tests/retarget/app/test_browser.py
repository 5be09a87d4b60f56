"""The app in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by Selenium) uploads the sample clip and photo, runs Retarget, and checks that the page's output
video plays a file with the clip's frame count. Screenshots of each tab are saved (to
$RETARGET_SCREENSHOTS when set, e.g. docs/, else the test's temporary folder).

Without a browser the test fails in CI (CI=true; .ci/run installs one) and is skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        msg = "no browser: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # As root in a closed network: no sandbox, and no background connections that would be refused.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(fn, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _tab(driver, name: str):
    from selenium.webdriver.common.by import By

    for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
        if b.text.strip() == name:
            b.click()
            time.sleep(1.0)
            return
    raise AssertionError(f"no tab {name!r}")


def test_retarget_in_a_real_browser(browser, served, sample_inputs, tmp_path):
    from selenium.webdriver.common.by import By

    from render.video import open_video

    url, _ = served
    shots = Path(os.environ.get("RETARGET_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    drive, actor = sample_inputs
    root = served[1].retarget_app.sessions.root
    before = set(root.iterdir())
    browser.get(url)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#rt-drive input[type=file]"), 60, "the page")

    browser.find_element(By.CSS_SELECTOR, "#rt-drive input[type=file]").send_keys(str(drive))
    browser.find_element(By.CSS_SELECTOR, "#rt-actor input[type=file]").send_keys(str(actor))
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#rt-drive video"), 60, "the driving clip's upload")
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#rt-actor img"), 60, "the photo's upload")
    for label in browser.find_elements(By.CSS_SELECTOR, "label"):
        if label.text.strip() == "fast":  # fast mode keeps the CPU test short
            label.click()
            break
    browser.find_element(By.CSS_SELECTOR, "#rt-go").click()

    video = _wait(lambda: [v for v in browser.find_elements(By.CSS_SELECTOR, "#rt-out video")
                           if v.get_attribute("src")], 300, "the output video")[0]
    src = video.get_attribute("src")
    ready = _wait(lambda: browser.execute_script(
        "const v = arguments[0]; return v.readyState >= 2 && v.duration > 0 ? v.duration : 0;", video),
        60, "the output video to load")
    browser.execute_script("arguments[0].muted = true; arguments[0].play();", video)
    _wait(lambda: browser.execute_script("return arguments[0].currentTime;", video) > 0, 30, "playback")
    status = browser.find_element(By.CSS_SELECTOR, "#rt-status").text
    assert "done: 8 frames" in status
    browser.save_screenshot(str(shots / "app_retarget.png"))

    played = tmp_path / "played.mp4"
    with urllib.request.urlopen(src, timeout=30) as r:
        played.write_bytes(r.read())
    reader = open_video(played)
    assert reader.frame_count == open_video(drive).frame_count == 8
    assert abs(ready - 8 / 25) < 0.1  # the element's duration: 8 frames at the clip's 25 fps

    for name, file in (("Expression studio", "app_studio.png"), ("Storyboard", "app_storyboard.png"),
                       ("Transitions", "app_transitions.png")):
        _tab(browser, name)
        browser.save_screenshot(str(shots / file))
    assert all((shots / f).stat().st_size > 10_000 for f in
               ("app_retarget.png", "app_studio.png", "app_storyboard.png", "app_transitions.png"))

    # Leaving the page ends the session: its output folder goes.
    (mine,) = set(root.iterdir()) - before  # this page's session folder
    assert list(mine.glob("*-retarget/out.mp4"))
    browser.get("about:blank")
    _wait(lambda: not mine.exists(), 60, "the session folder to be removed after the page closed")
