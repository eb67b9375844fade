"""The page in a real headless Chromium against `harmonifuse serve` with the shipped model: a test-split
WAV uploaded, then the same clip recorded through Chromium's fake microphone. Both runs must show a
transcript and four sorted probability bars, fetch nothing but the service, and fit a phone's width.
Screenshots at desktop and phone width go to a temporary folder, or to the folder named by
HARMONIFUSE_SCREENSHOTS (`HARMONIFUSE_SCREENSHOTS=results/serve make test` refreshes the README's
picture on purpose); `make test` leaves the committed ones untouched.

Needs Debian's `chromium` and `chromium-driver` (the Makefile installs them) and selenium; skipped,
saying which is missing, without them. Nothing is downloaded at run time.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_SHOTS = ROOT / "results" / "serve"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CORPUS = ROOT / "data" / "synthetic"

pytestmark = pytest.mark.slow
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed (Debian packages chromium and chromium-driver; "
                "`make install` adds them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from conftest import git_status  # noqa: E402
from serve_tiny import free_socket  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--mute-audio"]
DESKTOP, PHONE = (1280, 860), (390, 844)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A test-split clip: the synthetic corpus's first ASR test clip, or the same kind of clip read by
    a test voice when the corpus has not been built; padded with 0.3 s of silence each side."""
    out = tmp_path_factory.mktemp("clip") / "test-clip.wav"
    manifest = CORPUS / "asr_test.jsonl"
    if manifest.is_file():
        row = json.loads(manifest.read_text().splitlines()[0])
        wave, rate = sf.read(CORPUS / row["audio"], dtype="float32")
    else:
        from harmonifuse.data import synthetic

        try:
            wave = synthetic.synthesise("The estimates were puffed up", synthetic.VOICES["test"][0]).astype("float32")
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            pytest.skip(f"no test-split clip: the synthetic corpus is not built and flite failed ({error})")
        rate = 16000
    pad = np.zeros(int(0.3 * rate), dtype=np.float32)
    sf.write(out, np.concatenate([pad, wave, pad]), rate, subtype="PCM_16")
    return out


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: HARMONIFUSE_SCREENSHOTS, else a temporary folder."""
    chosen = os.environ.get("HARMONIFUSE_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def service():
    """`harmonifuse serve` with the shipped model on a free loopback port; SIGTERM at the end."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen([sys.executable, "-m", "harmonifuse.cli", "serve", "--port", str(port),
                                "--threads", "1", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(base + "/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the shipped model did not load in 300 s"
        time.sleep(0.2)
    yield base
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0


def browser(tmp_path: Path, *extra: str):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_window_size(*DESKTOP)
    return driver


def wait_for_result(driver, seconds: float = 300) -> None:
    def shown(d):
        error = d.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error: {error.text}")
        return len(d.find_elements(By.CSS_SELECTOR, "#emotions .emotion-row")) == 4
    WebDriverWait(driver, seconds, poll_frequency=0.2).until(shown)


def check_and_capture(driver, base: str, name: str, shots: Path) -> str:
    transcript = driver.find_element(By.ID, "transcript").text
    assert transcript and not transcript.startswith("("), transcript
    rows = driver.find_elements(By.CSS_SELECTOR, "#emotions .emotion-row")
    shares = [float(r.find_element(By.CLASS_NAME, "pct").text.rstrip("%")) for r in rows]
    assert len(rows) == 4 and shares == sorted(shares, reverse=True) and abs(sum(shares) - 100) < 0.5
    assert {r.find_element(By.CLASS_NAME, "label").text.lower() for r in rows} == {"neutral", "happy", "sad", "angry"}
    assert driver.find_element(By.ID, "model").text == "harmonifuse-demo"
    assert driver.find_element(By.ID, "latency").text.endswith("ms round trip")
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith(base) for url in fetched), fetched  # nothing beyond the service
    shots.mkdir(parents=True, exist_ok=True)
    for label, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": label == "phone"})
        time.sleep(0.3)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{label}: the page is {overflow} px wider than the window"
        full = max(height, driver.execute_script("return document.documentElement.scrollHeight"))
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": full, "scale": 1}})
        (shots / f"{name}-{label}.png").write_bytes(base64.b64decode(shot["data"]))
    return transcript


def test_the_page_answers_an_uploaded_test_clip(service, clip, shots, tmp_path):
    driver = browser(tmp_path)
    try:
        driver.get(service + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "ready-text").text == "ready")
        driver.find_element(By.ID, "file-input").send_keys(str(clip))
        wait_for_result(driver)
        transcript = check_and_capture(driver, service, "upload", shots)
    finally:
        driver.quit()
    direct = httpx.post(service + "/v1/audio/transcriptions", files={"file": ("clip.wav", clip.read_bytes())},
                        timeout=300).json()["text"]
    assert transcript.split()[:2] == direct.split()[:2]  # the browser's 16 kHz WAV reads like the file


def test_the_page_answers_a_recording_from_the_fake_microphone(service, clip, shots, tmp_path):
    seconds = sf.info(str(clip)).duration
    driver = browser(tmp_path, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                     f"--use-file-for-fake-audio-capture={clip}%noloop")
    try:
        driver.get(service + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "ready-text").text == "ready")
        record = driver.find_element(By.ID, "record")
        assert record.is_enabled(), "the microphone should be allowed on 127.0.0.1"
        record.click()
        WebDriverWait(driver, 10).until(lambda d: "Stop" in record.text)
        time.sleep(seconds + 0.7)
        assert driver.find_element(By.ID, "timer").text.startswith("0:0")
        record.click()
        wait_for_result(driver)
        check_and_capture(driver, service, "microphone", shots)
        duration = float(driver.find_element(By.ID, "duration").text.split()[0])
        assert seconds - 0.5 < duration < seconds + 3, duration
    finally:
        driver.quit()


def test_the_screenshots_leave_the_committed_ones_untouched(shots):
    """Runs after the two page tests (file order): their screenshots exist, and unless asked for,
    not one committed file under results/serve/ changed."""
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "microphone-desktop.png", "microphone-phone.png", "upload-desktop.png", "upload-phone.png"]
    if shots.resolve() != COMMITTED_SHOTS.resolve():
        assert git_status(COMMITTED_SHOTS) == ""
