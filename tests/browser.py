"""Headless Chromium for the page's tests and bench: Debian's `chromium` and `chromium-driver`, driven by
Selenium with the system's chromedriver (Selenium's own driver download is never used; this machine's network
may be closed). `ensure_browser()` installs the packages with apt-get when they are missing (as root); it
returns why it cannot, and the tests skip with that reason.

Every request the browser makes is recorded through the DevTools performance log (`requests(driver)`), so a
test can assert that the page never reaches beyond the server."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

PACKAGES = ("chromium", "chromium-driver")
# Flags of a quiet, offline browser: no first-run, sync, component updates or background traffic of its own.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--hide-scrollbars", "--force-color-profile=srgb")  # fmt: skip


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def driver_path() -> str | None:
    return shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.isfile(p)), None
    )


def ensure_browser(timeout: int = 900) -> str | None:
    """None when Chromium, its driver and Selenium are there (installing the packages if needed); else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    if chromium_path() and driver_path():
        return None
    from slurm_cluster import apt_install

    failed = apt_install(PACKAGES, "chromium/chromedriver missing", timeout)
    if failed:
        return failed
    return None if chromium_path() and driver_path() else "chromium/chromedriver still missing after apt-get"


def start_browser(width: int = 1480, height: int = 940):
    """A headless Chromium with a fresh profile and the performance log on; `driver.quit()` when done (the
    profile folder goes with `driver.profile.cleanup()`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.TemporaryDirectory(prefix="biovis-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path()
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile.name}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path()), options=options)
    driver.profile = profile
    return driver


def stop_browser(driver) -> None:
    try:
        driver.quit()
    finally:
        driver.profile.cleanup()


NETWORK_SCHEMES = ("http", "https", "ws", "wss", "ftp")


def requests(driver) -> list[dict]:
    """Every request the browser sent since the last call (DevTools `Network.requestWillBeSent`): its `url` and
    the `document` that asked for it. The browser's own pages (chrome://, e.g. a new-tab page it preloads) are
    served from inside the browser; what could leave the machine is a request with a network scheme."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            params = message["params"]
            sent.append({"url": params["request"]["url"], "document": params.get("documentURL", "")})
    return sent


def leaving(sent: list[dict], origin: str) -> list[str]:
    """The requests that went anywhere but `origin` (scheme://host:port): any network request elsewhere, and
    anything the page at `origin` asked for besides itself and the data: URLs it was sent."""
    out = []
    for request in sent:
        url, document = request["url"], request["document"]
        scheme = url.split(":", 1)[0].lower()
        if (
            scheme in NETWORK_SCHEMES
            and not url.startswith(origin + "/")
            or document.startswith(origin + "/")
            and not (url.startswith(origin + "/") or scheme in ("data", "blob"))
        ):
            out.append(url)
    return out


def console_errors(driver) -> list[str]:
    """The page's console errors and CSP violations since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


# ---------------------------------------------------------------------------------------------- driving the page
# Shared by tests/test_explore_browser.py and bench/bench_explore.py: the same steps, on tiny or demo models.


def wait_for(driver, script: str, *args, timeout: float = 60.0, what: str = "the page"):
    """Poll `script` (JavaScript returning a value) until it is truthy; its value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}: {script[:120]}")
        time.sleep(0.01)


def open_page(driver, url: str) -> dict:
    """Load the page; (seconds to the load event, seconds until the tabs and the first view are drawn)."""
    driver.get(url)
    wait_for(driver, "return document.body && document.body.dataset.ready", what="the page to be ready")
    timing = driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {load: n.loadEventEnd - n.startTime, ready: window.exploreReadyAt};"
    )
    if not timing["load"]:
        timing["load"] = wait_for(driver, "const n = performance.getEntriesByType('navigation')[0];"
                                          "return n.loadEventEnd > 0 && n.loadEventEnd - n.startTime;")  # fmt: skip
    return {"load_s": timing["load"] / 1000, "ready_s": timing["ready"] / 1000}


def open_tab(driver, kind_label: str):
    """Click the tab whose kind reads `kind_label` (Concepts, Retrieval, Phylo-NN, CVAE, Runs); its section."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "nav#tabs button"):
        if button.find_element(By.CSS_SELECTOR, ".kind").text == kind_label:
            button.click()
            tab = button.get_attribute("data-tab")
            return wait_for(
                driver, "return document.querySelector(`section[data-tab='${arguments[0]}']`)", tab
            )
    raise LookupError(f"no {kind_label} tab")


def choose_image(driver, section, index: int) -> None:
    """Click gallery image `index` and wait until its explanation is drawn."""
    from selenium.webdriver.common.by import By

    section.find_element(By.CSS_SELECTOR, f".gallery .thumb[data-index='{index}']").click()
    wait_for(driver, "return arguments[0].querySelector('.headline').textContent.includes(arguments[1]) &&"
                     "arguments[0].querySelector('img.amplified').src", section, f"image #{index},",
             what="the chosen image")  # fmt: skip


def move_slider(driver, section, key, position: int = 0) -> dict:
    """Press `key` on the position-th concept slider and wait for the new image: its concept, value, image."""
    from selenium.webdriver.common.by import By

    rendered = int(section.get_attribute("data-rendered") or 0)
    slider = section.find_elements(By.CSS_SELECTOR, ".slider input[type=range]")[position]
    slider.send_keys(key)
    wait_for(driver, "return Number(arguments[0].dataset.rendered || 0) > arguments[1]", section, rendered,
             what="the regenerated image")  # fmt: skip
    return {"concept": int(slider.get_attribute("data-concept")), "value": float(slider.get_attribute("value")),
            "image": section.find_element(By.CSS_SELECTOR, "img.amplified").get_attribute("src")}  # fmt: skip
