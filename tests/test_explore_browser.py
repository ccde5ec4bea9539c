"""`explore` in a real browser (headless Chromium, Debian's `chromium` + `chromium-driver`, driven by Selenium):
load the page of a VisCoIN bundle, pick an image, move a slider and get `amplify`'s image for those multipliers,
identify a specimen by its DNA barcode, click a tree node and get samples, see training curves, with every
request the browser makes going to the server itself; and the token enforced off loopback.

Screenshots go to $BIOVIS_EXPLORE_SCREENSHOTS when set (the README's come from `bench/bench_explore.py
--screenshots`, the same steps on the world demo's models)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from browser import (
    choose_image,
    console_errors,
    ensure_browser,
    leaving,
    move_slider,
    open_page,
    open_tab,
    requests,
    start_browser,
    stop_browser,
    wait_for,
)
from helpers_explore import png_of_data_url, session_server, start_server, stop
from test_explore_api import amplify_reference, png_of
from test_gan_training import one_thread  # noqa: F401  (autouse: small networks on one thread)


@pytest.fixture(scope="module")
def server(small_world, tmp_path_factory):
    return session_server(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    reason = ensure_browser()
    if reason:
        pytest.skip(f"no browser for the page's tests: {reason}")
    driver = start_browser()
    requests(driver)  # the browser's own start-up pages are not the page's requests
    console_errors(driver)
    yield driver
    stop_browser(driver)


@pytest.fixture(autouse=True)
def cache(server, monkeypatch):
    monkeypatch.setenv("BIOVIS_CACHE", str(server.sources.cache))


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("BIOVIS_EXPLORE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))
    return folder / name


def test_the_page_in_a_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from datasets.bioscan.hdf5 import read_labels

    d = browser
    origin = f"http://127.0.0.1:{server.port}"
    timing = open_page(d, origin + "/")
    assert 0 < timing["ready_s"] < 30

    # Concepts: pick an image, drag the first slider to its end, get amplify's image for those multipliers
    section = open_tab(d, "Concepts")
    choose_image(d, section, 5)
    before = section.find_element(By.CSS_SELECTOR, "img.amplified").get_attribute("src")
    moved = move_slider(d, section, Keys.END)
    assert moved["value"] == 4.0 and moved["image"] != before
    reference = amplify_reference(server.view("concepts").analysis, 5, [moved["concept"]], 4.0)
    assert png_of_data_url(moved["image"]) == png_of(reference["images_selected"][0])
    p_text = section.find_element(By.CSS_SELECTOR, "figure.amplified .p").text
    assert p_text == f"p_f = {100 * float(reference['p_selected'][0, 0]):.1f}%"
    # another browser tab chooses another image: this tab's slider goes on with its own
    first = d.current_window_handle
    d.switch_to.new_window("tab")
    open_page(d, origin + "/")
    choose_image(d, open_tab(d, "Concepts"), 40)
    d.close()
    d.switch_to.window(first)
    moved = move_slider(d, section, Keys.LEFT)
    reference = amplify_reference(server.view("concepts").analysis, 5, [moved["concept"]], 3.95)
    assert moved["value"] == 3.95
    assert png_of_data_url(moved["image"]) == png_of(reference["images_selected"][0])

    section.find_element(By.CSS_SELECTOR, ".slider .concept-name").click()  # heat map and concept card
    wait_for(d, "return arguments[0].querySelector('img.heat').src", section, what="the heat map")
    wait_for(d, "return arguments[0].querySelectorAll('.card .gallery .thumb').length === 8", section,
             timeout=120, what="the concept card")  # fmt: skip
    screenshot(d, "explore-concepts.png", tmp_path)

    # a bad input gets a message on the page, and the page goes on working
    field = section.find_element(By.CSS_SELECTOR, "input[aria-label='concept index to add']")
    field.send_keys("999", Keys.ENTER)
    message = section.find_element(By.CSS_SELECTOR, ".panel .msg.error").text
    assert "concept 999 is out of range" in message

    # Retrieval: a key's own barcode identifies its species
    data = server.sources.retrieval_data
    labels = read_labels(data, "all_keys")
    import h5py

    with h5py.File(data) as f:
        barcode = f["all_keys"]["barcode"][4].decode()
    concepts = section
    section = open_tab(d, "Retrieval")
    assert section.is_displayed() and not concepts.is_displayed()  # one tab shown at a time
    section.find_element(By.TAG_NAME, "textarea").send_keys(barcode)
    section.find_element(By.XPATH, ".//button[text()='Identify']").click()
    wait_for(d, "return arguments[0].querySelector('.result')", section, what="the identification")
    species = section.find_elements(By.CSS_SELECTOR, ".result table.prediction td.taxon")[-1].text
    assert species == labels["species"][4].replace("_", " ")
    wait_for(d, "return arguments[0].querySelector('.legend .legend-item')", section, what="the projection")
    screenshot(d, "explore-retrieval.png", tmp_path)

    # Generation: a click on a tree node returns its samples
    section = open_tab(d, "Phylo-NN")
    node = section.find_elements(By.CSS_SELECTOR, "circle.node.clickable")[1]
    label = node.get_attribute("data-label")
    node.click()
    wait_for(
        d, "return arguments[0].querySelectorAll('.samples img').length === 8", section, what="the samples"
    )
    assert label in section.find_element(By.CSS_SELECTOR, ".headline").text
    screenshot(d, "explore-phylo.png", tmp_path)
    section = open_tab(d, "CVAE")
    wait_for(d, "return arguments[0].querySelector('img.live').src", section, what="the CVAE's images")

    # Runs: the curves of the runs under the folder
    section = open_tab(d, "Runs")
    wait_for(d, "return arguments[0].querySelectorAll('svg.chart').length > 2", section, what="the curves")
    screenshot(d, "explore-runs.png", tmp_path)

    # nothing left the machine: every network request went to the server (images are data: URLs it sent)
    sent = requests(d)
    assert not leaving(sent, origin), leaving(sent, origin)
    assert sum(r["url"].startswith(origin + "/api/") for r in sent) > 10
    assert not console_errors(d)  # no script error, no blocked (CSP) load


def outward_address() -> str:
    """A non-loopback address of this machine when it has one (else 127.0.0.1: still off a loopback bind)."""
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            if not info[4][0].startswith("127."):
                return info[4][0]
    except OSError:
        pass
    return "127.0.0.1"


def test_the_token_is_enforced_off_loopback(server, browser):
    from selenium.webdriver.common.by import By

    other = start_server(server.sources, host="0.0.0.0", paths=[server.sources.runs])
    try:
        base = f"http://{outward_address()}:{other.port}"
        browser.get(base + "/")
        assert "403: this page needs its token" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(f"{base}/?token={other.server.token}")
        wait_for(browser, "return document.body.dataset.ready", what="the page with its token")
        assert (
            urlsplit(browser.current_url).query == ""
        )  # the token went into a cookie, out of the address bar
        assert browser.find_element(By.CSS_SELECTOR, "nav#tabs .kind").text == "Runs"
        sent = requests(browser)
        assert not leaving(sent, base) and any(r["url"].startswith(base + "/api/") for r in sent)
        console_errors(browser)  # the deliberate 403 page logs a failed load
    finally:
        stop(other)
